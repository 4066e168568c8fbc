"""Paths the rest of the suite left unrun (branch coverage of the suite under coverage.py, 94% of
lorakit's branches): error paths on bad input, the public ``LinearNF4`` constructor, mixed-batch
fallbacks and a training run from a worker thread. Each test failed on a mutation of the code it
covers (named in its comments where not obvious)."""
from __future__ import annotations

import threading

import pytest
import torch
from conftest import tiny_llama
from torch import nn
from tiny_lm import tiny_llama_lm, tiny_tokenizer, toy_records, write_jsonl

import lorakit as lk


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    now = model.state_dict()
    return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)


# ---------------------------------------------------------------- config (config.py 141, 147, 156, 200)
def test_tuple_and_set_targets_become_sorted_lists_and_a_range_of_layers_a_list():
    cfg = lk.LoraConfig(r=2, target_modules=("v_proj", "q_proj"), modules_to_save={"lm_head"},
                        layers_to_transform=range(1, 2))
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.modules_to_save == ["lm_head"]
    assert cfg.layers_to_transform == [1]
    model = lk.get_lora_model(tiny_llama(), cfg)
    assert sorted(n for n, _ in lk.iter_lora_layers(model)) == ["model.layers.1.self_attn.q_proj",
                                                               "model.layers.1.self_attn.v_proj"]


@pytest.mark.parametrize("kw, message", [
    (dict(target_modules=5), "target_modules must be a list of names or a string, got 5"),
    (dict(target_modules=["q_proj"], init_lora_weights=1), "init_lora_weights must be a bool or a string, got 1"),
])
def test_config_values_of_the_wrong_type_are_refused_by_name(kw, message):
    with pytest.raises(TypeError, match=message):
        lk.LoraConfig(r=2, **kw)


# ---------------------------------------------------------------- NF4 (nf4_linear.py 52-58, 120; quant.py 71, 199)
def test_linear_nf4_constructed_directly_runs_and_loads_a_quantised_state():
    layer = lk.LinearNF4(16, 8)
    assert torch.equal(layer(torch.randn(3, 16)), torch.zeros(3, 8))  # zero weight, zero bias
    assert "in_features=16, out_features=8, bias=True" in repr(layer)
    torch.manual_seed(0)
    dense = nn.Linear(16, 8)
    layer.load_state_dict(lk.LinearNF4.from_linear(dense).state_dict())
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), lk.LinearNF4.from_linear(dense)(x))
    assert lk.LinearNF4(16, 8, bias=False).bias is None


@pytest.mark.parametrize("kw, message", [
    (dict(block_size=3), "even block_size >= 2"),
    (dict(block_size=0), "even block_size >= 2"),
    (dict(skip=[5]), "skip must hold module names or regexes, got 5"),
])
def test_quantize_model_nf4_refuses_bad_settings_and_changes_nothing(kw, message):
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        lk.quantize_model_nf4(model, **kw)
    assert _same(model, snap) and not any(isinstance(m, lk.LinearNF4) for m in model.modules())


# ---------------------------------------------------------------- io (io.py 168, 253, 621)
def test_unknown_adapter_names_and_a_file_in_the_way_are_refused(tmp_path):
    model = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"unknown adapter 'nope'; this model has \['default'\]"):
        lk.adapter_state_dict(model, "nope")
    lk.save_adapter(model, tmp_path / "a")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"unknown adapter 'nope'"):
        lk.load_adapter_weights(model, tmp_path / "a", adapter_name="nope")
    assert _same(model, snap)
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        lk.save_adapter(model, blocker)
    assert blocker.read_text() == "keep"


# ---------------------------------------------------------------- inject (inject.py 352, 431)
def test_no_match_message_names_layers_to_transform():
    cfg = lk.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[5])
    with pytest.raises(ValueError, match=r"matched no module of LlamaForCausalLM \(with layers_to_transform=\[5\]"):
        lk.get_lora_model(tiny_llama(), cfg)


# ---------------------------------------------------------------- mixed batches (base.py 377-380, linear.py 227)
def test_a_dora_adapter_on_contiguous_rows_of_a_mixed_batch_matches_it_alone():
    model = tiny_llama().double()
    for name, dora in (("d", True), ("p", False)):
        lk.get_lora_model(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                               use_dora=dora), adapter_name=name)
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (3, 5))
    names = ["d", "d", "p"]  # DoRA's rows are a slice
    with torch.no_grad(), lk.adapter_batch(model, names):
        mixed = model(ids).logits
    for i, name in enumerate(names):
        lk.set_adapter(model, name)
        with torch.no_grad():
            torch.testing.assert_close(model(ids[i:i + 1]).logits[0], mixed[i], rtol=0, atol=1e-10)


def test_many_loaded_adapters_few_used_take_the_per_adapter_path_and_match(monkeypatch):
    import lorakit.layers.base as base

    model = tiny_llama().double()
    for k in range(10):
        torch.manual_seed(k)
        lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
                          adapter_name=f"a{k}")
    ids = torch.randint(3, 100, (2, 5))
    names = ["a0", "a9"]  # the stacked slots a0..a9 would be 80% padding
    calls = []
    original = base.LoraLayer.mixed_forward

    def spy(self, *args):
        calls.append(1)
        return original(self, *args)
    monkeypatch.setattr(base.LoraLayer, "mixed_forward", spy)
    with torch.no_grad(), lk.adapter_batch(model, names):
        mixed = model(ids).logits
    monkeypatch.undo()
    assert len(calls) == 2  # one per q_proj: the padding fallback
    for i, name in enumerate(names):
        lk.set_adapter(model, name)
        with torch.no_grad():
            torch.testing.assert_close(model(ids[i:i + 1]).logits[0], mixed[i], rtol=0, atol=1e-10)


# ---------------------------------------------------------------- train (loop.py 933, 1294, 1316)
@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(toy_records(32), tmp_path_factory.mktemp("data") / "train.jsonl")


def _cfg(tmp_path, data_file, **kw):
    from lorakit.train.config import TrainConfig

    return TrainConfig(**{**dict(data=str(data_file), output=str(tmp_path / "run"), batch_size=8, lr=1e-2,
                                 precision="fp32", max_steps=2, save_steps=0, seed=0), **kw})


def test_train_with_a_model_but_no_tokenizer_is_refused(tmp_path, data_file):
    from lorakit.train.loop import train

    with pytest.raises(ValueError, match=r"train\(model=...\) also needs its tokenizer"):
        train(_cfg(tmp_path, data_file), model=tiny_llama_lm(tiny_tokenizer()), progress=False, log=lambda *_: None)


def test_a_run_from_a_worker_thread_trains_and_leaves_the_signal_handlers_alone(tmp_path, data_file):
    """A notebook / web app calls train() off the main thread: signal.signal would raise there."""
    import signal

    from lorakit.train.loop import train

    tok = tiny_tokenizer()
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out = {}

    def work():
        try:
            out["res"] = train(_cfg(tmp_path, data_file), model=tiny_llama_lm(tok), tokenizer=tok,
                               progress=False, log=lambda *_: None)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            out["exc"] = exc
    t = threading.Thread(target=work)
    t.start()
    t.join(300)
    assert not t.is_alive() and "exc" not in out, out.get("exc")  # (signal.signal raises off the main thread)
    assert out["res"].steps == 2 and not out["res"].interrupted
    assert {s: signal.getsignal(s) for s in before} == before


# ---------------------------------------------------------------- accelerate's offload (a big-model audit)
def _offload_reference():
    cfg = lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    reference = tiny_llama()
    torch.manual_seed(0)
    lk.get_lora_model(reference, cfg)
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        expected = reference(ids).logits
    return cfg, reference, ids, expected


def test_adapters_moved_to_meta_by_an_offload_after_injection_are_an_error_not_garbage(tmp_path):
    from accelerate import cpu_offload

    cfg, reference, ids, expected = _offload_reference()
    cpu_offload(reference, execution_device=torch.device("cpu"))  # (moves lora_A / lora_B to meta too)
    with pytest.raises(RuntimeError, match=r"adapter\(s\) \['default'\] are on the meta device"), torch.no_grad():
        reference(ids)
    with pytest.raises(RuntimeError, match="on the meta device"):
        reference(ids)  # (with gradients: the generic path)
    with pytest.raises(ValueError, match="tensors on the meta device, with no data to save"):
        lk.save_adapter(reference, tmp_path / "a")
    assert not (tmp_path / "a").exists()
