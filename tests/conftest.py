"""Shared fixtures: tiny models built in-process (no downloads), and the layer-type / variant grid."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*bos_token_id.*")
warnings.filterwarnings("ignore", message=".*eos_token_id.*")
torch.set_num_threads(min(2, torch.get_num_threads()))

from lorakit.layers import fused, gemm  # noqa: E402

#: The library's size rules, read before any test changes them.
DEFAULT_KERNELS_MIN_NUMEL, DEFAULT_ONEDNN_MIN_MACS = fused.KERNELS_MIN_NUMEL, gemm.ONEDNN_MIN_MACS
DEFAULT_ONEDNN_PAYS = gemm.ONEDNN_PAYS


@pytest.fixture(autouse=True)
def _kernels_at_every_size():
    """The tests run lorakit's training kernels and oneDNN's products on tiny models, which by default
    take autograd's plain ops below ``KERNELS_MIN_NUMEL`` input elements and torch's kernel below
    ``ONEDNN_MIN_MACS`` multiply-adds (tests/test_kernel_size.py and test_gemm.py check those rules,
    setting the thresholds themselves), and oneDNN also on CPUs where it does not pay
    (``gemm.ONEDNN_PAYS``: Intel's, with MKL), so its paths are tested on every machine. Not
    monkeypatch: test_gemm's ``_routed`` undoes its patches mid-test."""
    fused.KERNELS_MIN_NUMEL = gemm.ONEDNN_MIN_MACS = 0
    gemm.ONEDNN_PAYS = True
    yield
    fused.KERNELS_MIN_NUMEL, gemm.ONEDNN_MIN_MACS = DEFAULT_KERNELS_MIN_NUMEL, DEFAULT_ONEDNN_MIN_MACS
    gemm.ONEDNN_PAYS = DEFAULT_ONEDNN_PAYS


@pytest.fixture(autouse=True)
def _sigint_as_in_a_terminal():
    """Every test sees SIGINT handled as Python does by default (KeyboardInterrupt), the old handler
    after it: pytest started in the background by a script inherits SIGINT ignored, and a training
    run keeps ignoring a signal it was started ignoring, so the tests that press Ctrl-C (a SIGINT to
    their own process) would see nothing happen."""
    import signal

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def graph_node_names(fn) -> set[str]:
    """The class names of every autograd node reachable from ``fn`` (a tensor's ``grad_fn``)."""
    seen, todo, names = set(), [fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


def tiny_llama(seed: int = 0, tie: bool = False, bias: bool = False):
    """A random 2-layer Llama causal LM (hidden 32, vocab 101); ``bias``: q/k/v/o with biases (as Qwen2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie, attention_bias=bias, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def lora_llama(targets="all-linear", dropout: float = 0.0, dtype=torch.float64, bias: bool = False):
    """``tiny_llama`` in ``dtype`` with an r = 4 LoRA (random B, so gradients flow everywhere), in train mode."""
    import lorakit as lk

    model = tiny_llama(bias=bias).to(dtype)
    lk.get_lora_model(model, lk.LoraConfig(r=4, target_modules=targets, lora_dropout=dropout, init_lora_weights=False))
    return model.train()


def loss_and_grads(model, ids, seed: int | None = None):
    """(LM loss on ``ids``, gradients of the trainable parameters); ``seed`` first, so two runs draw
    the same dropout masks."""
    if seed is not None:
        torch.manual_seed(seed)
    loss = model(ids, labels=ids).loss
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


def assert_same_in_float64(result, reference) -> None:
    """Two ``loss_and_grads`` results agree to float64 rounding (and there are gradients to compare)."""
    (loss, grads), (ref_loss, ref_grads) = result, reference
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert len(grads) == len(ref_grads) > 0
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def tiny_gpt2(seed: int = 0):
    """A random 2-layer GPT-2 LM (uses transformers' Conv1D; hidden 32, vocab 97)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=97, n_positions=64, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


class TinyConvNet(nn.Module):
    """A small CNN classifier: two Conv2d (with bias), a pooled Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(h.mean(dim=(2, 3)))


class Wrap(nn.Module):
    """One layer under test inside a module, so injection has a name to target ("layer")."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _conv1d():
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(12, 10)  # nf=12 outputs, nx=10 inputs; weight (10, 12)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


def _linear():
    layer = nn.Linear(10, 12, bias=True)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


#: layer type -> (factory of a base layer with bias where the type has one, factory of an input)
LAYER_CASES = {
    "linear": (_linear, lambda: torch.randn(3, 5, 10)),
    "gpt2_conv1d": (_conv1d, lambda: torch.randn(3, 5, 10)),
    "embedding": (lambda: nn.Embedding(20, 12), lambda: torch.randint(0, 20, (3, 5))),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=1, padding=1, bias=True), lambda: torch.randn(2, 4, 7, 7)),
}

#: variant name -> extra LoraConfig fields. Variants added to lorakit add a row here so every
#: invariant test runs over them too.
VARIANT_CASES: dict[str, dict] = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    # Init methods that move the principal part of W into A, B (the base keeps the residual): the
    # output is kept up to float rounding, and saving uses convert_to_lora=True (see test_invariants).
    "pissa": {"init_lora_weights": "pissa"},
    "pissa_niter": {"init_lora_weights": "pissa_niter_4"},
    "olora": {"init_lora_weights": "olora"},
}


def supported(layer_name: str, variant: str) -> bool:
    """Whether lorakit offers ``variant`` on ``layer_name``: PiSSA / OLoRA are refused on Conv2d, as
    PEFT refuses them (tests/test_variants_pissa.py checks the refusal)."""
    return not (layer_name == "conv2d" and "init_lora_weights" in VARIANT_CASES[variant])


@pytest.fixture(params=sorted(LAYER_CASES))
def layer_case(request):
    torch.manual_seed(0)
    make_layer, make_input = LAYER_CASES[request.param]
    return request.param, make_layer, make_input


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """Stand-in for the GGUF reader: a tiny model, counting conversions (the model cache's tests)."""
    from lorakit import models
    from tiny_lm import tiny_llama_lm, tiny_tokenizer

    calls = []
    gguf = tmp_path / "wheel" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(100))

    def fake_load(path, dtype):
        calls.append(path)
        tok = tiny_tokenizer()
        return tiny_llama_lm(tok), tok
    monkeypatch.setattr(models, "_load_gguf", fake_load)
    monkeypatch.setattr(models, "default_gguf_path", lambda: gguf)
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path / "cache"))
    return calls
