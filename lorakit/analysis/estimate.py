"""Memory and compute estimate of one training step: full fine-tuning, LoRA and QLoRA.

The estimate is a *model of the allocator*, not a rule of thumb: it lists the tensors a
Llama-style decoder (Hugging Face ``transformers`` implementation) keeps alive during a step and
replays the step's phases to find the peak:

1. forward: weights + optimizer states (from the previous step) + every tensor autograd saves for
   backward, plus the logits while the loss is computed;
2. backward: at the loss, two vocabulary-sized gradients exist on top of the saved activations;
   then, layer by layer from the top, saved activations are freed while parameter gradients appear;
3. optimizer step: weights + gradients + states + the update's temporaries.

Peak = the largest of those moments. Parameter gradients are assumed cleared with
``zero_grad(set_to_none=True)`` (PyTorch's default) and the model output is not held past ``.loss``.

What autograd saves per decoder layer was read off the implementation (and is checked against
measured allocations by ``tests/test_analysis_estimate.py``): with N = batch x seq tokens,
hidden h, key/value width h_kv, MLP width f, bytes per element b,

* RMSNorm: its (fp32) input, N*h*4, and the normalised tensor if the norm weight trains;
* q/k/v projections: their common input (N*h*b) if any of them trains;
* attention (SDPA, flash-style kernel): rotated q (N*h*b), rotated k and v (N*h_kv*b each), the
  output (N*h*b) and a log-sum-exp; ``eager`` attention also keeps the B*heads*T*T probabilities;
* MLP: gate output, SiLU output, up output (3*N*f*b), and the product (N*f*b) if down_proj trains;
* LoRA: for each adapted module its input (shared with the other adapters on the same input) and
  the rank-r intermediate, N*r*b.

A frozen ``nn.Linear`` saves nothing (its weight gradient is not needed), which is why LoRA's
activation memory is well below full fine-tuning's even at equal batch and sequence length.
"""
from __future__ import annotations

import warnings

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ATTN_IN = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("full", "lora", "qlora")
PRECISIONS = ("fp32", "bf16", "fp16", "mixed")
OPTIMIZERS = ("adamw", "sgd", "adamw8bit")
OPTIMIZER_IMPLS = ("per-tensor", "foreach", "fused")
ATTENTIONS = ("sdpa", "eager")

# bitsandbytes NF4 with double quantisation (QLoRA paper, section 3): 4-bit weights, one 8-bit
# absmax per 64 weights, one fp32 constant per 256 absmax values -> 4.127 bits per parameter.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# bitsandbytes 8-bit blockwise optimizer states: 1 byte per value + one fp32 absmax per 256.
INT8_STATE_BYTES = 1 + 4 / 256


# config.json keys of a mixture-of-experts model (Mixtral, Qwen2-MoE, DeepSeek, ...)
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
# model types whose projections are fused into one matrix (no q_proj / gate_proj modules)
_FUSED_PROJECTIONS = {"phi3": "qkv_proj, gate_up_proj", "gpt_neox": "query_key_value", "falcon": "query_key_value",
                      "bloom": "query_key_value", "gpt_bigcode": "c_attn", "phi": "dense, fc1/fc2",
                      "persimmon": "query_key_value"}
# model types laid out as a Llama decoder (q/k/v/o, gate/up/down, RMSNorms), and their norm weights
_LLAMA_LAYOUT = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "olmo3", "granite",
                 "smollm3", "cohere", "stablelm", "internlm2", "yi"}
# model types whose MLP has no gate (an up / down pair), which the Llama layout's three would overcount
_UNGATED_MLP = {"starcoder2": "c_fc / c_proj with biases, LayerNorms", "arcee": "up_proj / down_proj",
                "apertus": "up_proj / down_proj", "nemotron": "up_proj / down_proj"}
# model types whose classes take head_dim as hidden_size / num_attention_heads whatever the config says
_IGNORES_HEAD_DIM = {"stablelm"}
#: Model types whose transformers classes do not read a config's ``mlp_bias`` / ``attention_bias``
#: (their MLPs have no biases; Mistral's attention none, Qwen2's q/k/v always: ``qkv_bias``; StableLM's
#: follow ``use_qkv_bias``, not read here), checked against the models transformers builds; a key
#: there was counted.
_IGNORES_MLP_BIAS = {"mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "olmo3", "cohere", "stablelm"}
_IGNORES_ATTENTION_BIAS = {"mistral", "qwen2", "stablelm"}
_NORMS = {"gemma2": (4, 1, 0), "qwen3": (2, 1, 2), "olmo": (0, 0, 0), "cohere": (1, 1, 0), "stablelm": (4, 2, 0)}
#: model types whose q / k norms span all heads' width (OLMo2's q_norm is num_heads x head_dim wide)
_FULL_WIDTH_QK_NORMS = {"olmo2", "olmo3"}


def _class_default(model_type: str | None, attr: str, keys: dict[str, Any] | None = None) -> Any:
    """``attr`` of the config transformers' class for ``model_type`` builds from ``keys`` (its own
    defaults for the rest: what a config.json that leaves ``attr`` out gets), None where
    transformers does not know the type or the class refuses the keys."""
    try:
        from transformers import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            return None
        return getattr(CONFIG_MAPPING[model_type](**(keys or {})), attr, None)
    except Exception:  # (no transformers, or a config class that needs or refuses arguments)
        return None


def _default_head_dim(model_type: str | None, config: dict[str, Any]) -> int | None:
    """The ``head_dim`` transformers' config class for ``model_type`` gives a config that leaves the
    key out (Gemma's class 256, Qwen3's 128, not hidden_size / num_attention_heads); None where the
    class derives none or transformers does not know the type."""
    keys = {k: config[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads") if k in config}
    value = _class_default(model_type, "head_dim", keys)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def _default_tie(model_type: str | None) -> bool:
    """transformers' default ``tie_word_embeddings`` for ``model_type`` (a config.json may leave it
    out: Gemma's do, and Gemma ties), False where transformers does not know the type."""
    return bool(_class_default(model_type, "tie_word_embeddings"))


@dataclass(frozen=True)
class ModelShape:
    """Shapes of a Llama-style decoder-only transformer (Llama, Mistral, Qwen2, SmolLM2...).

    Attributes:
        hidden_size: width h of the residual stream.
        intermediate_size: width f of the gated MLP.
        num_layers: number of decoder layers L.
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention when < num_heads).
        head_dim: per-head width.
        vocab_size: vocabulary V.
        tie_word_embeddings: whether lm_head shares the embedding matrix.
        attention_bias: q/k/v/o carry biases.
        qkv_bias: q/k/v carry biases, o does not (Qwen2, whatever its config's ``attention_bias``).
        mlp_bias: gate/up/down carry biases.
        name: label for reports.
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    name: str = "model"
    qkv_bias: bool = False
    #: normalisation weights: (hidden-wide per layer, hidden-wide at the end, head_dim-wide per layer):
    #: Llama (2, 1, 0); Gemma2 (4, 1, 0); Qwen3's q/k norms (2, 1, 2); OLMo's LayerNorm has none (0, 0, 0);
    #: Cohere one norm a layer (1, 1, 0); StableLM LayerNorms with biases (4, 2, 0)
    norms: tuple[int, int, int] = (2, 1, 0)
    #: a q and a k norm per layer as wide as q's and k's outputs (OLMo2), not one head's
    full_width_qk_norms: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "model") -> ModelShape:
        """Read the shape from a ``config.json`` dictionary of a Llama-style model.

        Raises:
            ValueError: if the config is not a dict, a required key (hidden_size, intermediate_size,
                num_hidden_layers, num_attention_heads, vocab_size) is missing, or a size is not an
                integer >= 1.
        """
        if not isinstance(config, dict):
            raise ValueError(f"config of {name!r} must be a JSON object, got {type(config).__name__}")
        need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [k for k in need if config.get(k) is None]
        if missing:
            raise ValueError(
                f"config of {name!r} lacks {missing}: the estimator models Llama-style decoders "
                f"(model_type {config.get('model_type')!r})"
            )

        def size(key: str, default: Any = None) -> int:
            value = config.get(key) if config.get(key) is not None else default
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config of {name!r}: {key} must be an integer >= 1, got {value!r}")
            return value

        experts = next((k for k in _MOE_KEYS if config.get(k) not in (None, 0, 1, False)), None)
        if experts is not None:
            raise ValueError(f"config of {name!r} is a mixture of experts ({experts}={config[experts]!r}, model_type "
                             f"{config.get('model_type')!r}): the estimator models dense Llama-style decoders, and "
                             "would count one MLP per layer")
        model_type = config.get("model_type")
        if model_type in _FUSED_PROJECTIONS:
            raise ValueError(f"config of {name!r}: model_type {model_type!r} fuses its projections "
                             f"({_FUSED_PROJECTIONS[model_type]}), which the estimator's Llama layout does not have")
        if model_type in _UNGATED_MLP:
            raise ValueError(f"config of {name!r}: model_type {model_type!r} has an MLP without a gate "
                             f"({_UNGATED_MLP[model_type]}); the estimator's Llama layout counts gate, up and down")
        if model_type is not None and model_type not in _LLAMA_LAYOUT:
            warnings.warn(f"config of {name!r}: model_type {model_type!r} is not one the estimator knows "
                          f"({', '.join(sorted(_LLAMA_LAYOUT))}); it is estimated as a Llama-style dense decoder",
                          stacklevel=2)
        heads = size("num_attention_heads")
        h = size("hidden_size")
        kv = size("num_key_value_heads", heads)
        if heads % kv:
            raise ValueError(f"config of {name!r}: num_attention_heads ({heads}) must be a multiple of "
                             f"num_key_value_heads ({kv})")
        # a config that leaves head_dim out takes its class's default (Gemma 256, Qwen3 128), as transformers does
        head_dim = (None if "head_dim" in config else _default_head_dim(model_type, config)) or h // heads
        if model_type not in _IGNORES_HEAD_DIM:
            head_dim = size("head_dim", head_dim)
        tie = config.get("tie_word_embeddings")
        if tie is None:  # the config class's own default: Gemma ties, Llama does not
            tie = _default_tie(model_type)
        return cls(
            hidden_size=h,
            intermediate_size=size("intermediate_size"),
            num_layers=size("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            vocab_size=size("vocab_size"),
            tie_word_embeddings=bool(tie),
            attention_bias=model_type not in _IGNORES_ATTENTION_BIAS and bool(config.get("attention_bias", False)),
            mlp_bias=model_type not in _IGNORES_MLP_BIAS and bool(config.get("mlp_bias", False)),
            name=name,
            qkv_bias=model_type == "qwen2",
            norms=_NORMS.get(model_type, (2, 1, 0)),
            full_width_qk_norms=model_type in _FULL_WIDTH_QK_NORMS,
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear module of one decoder layer, by module name."""
        h, f = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f),
        }

    def layer_params(self) -> int:
        """Parameters of one decoder layer (linears, biases, two RMSNorm weights)."""
        shapes = self.linear_shapes()
        n = sum(o * i for o, i in shapes.values()) + self.norms[0] * self.hidden_size + self.norms[2] * self.head_dim
        if self.full_width_qk_norms:
            n += shapes["q_proj"][0] + shapes["k_proj"][0]
        if self.attention_bias:
            n += sum(shapes[k][0] for k in ("q_proj", "k_proj", "v_proj", "o_proj"))
        elif self.qkv_bias:
            n += sum(shapes[k][0] for k in ("q_proj", "k_proj", "v_proj"))
        if self.mlp_bias:
            n += sum(shapes[k][0] for k in ("gate_proj", "up_proj", "down_proj"))
        return n

    def embedding_params(self) -> int:
        """Parameters of the input embedding (V x h)."""
        return self.vocab_size * self.hidden_size

    def head_params(self) -> int:
        """Final norm plus lm_head (0 extra when tied to the embedding)."""
        lm = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.norms[1] * self.hidden_size + lm

    def total_params(self) -> int:
        """All parameters of the model (tied matrices counted once)."""
        return self.embedding_params() + self.num_layers * self.layer_params() + self.head_params()

    def lora_params(self, r: int, target_modules: tuple[str, ...]) -> int:
        """LoRA parameters r * (in + out) summed over the targeted linears of every layer."""
        shapes = self.linear_shapes()
        return self.num_layers * sum(r * (o + i) for name, (o, i) in shapes.items() if name in target_modules)


# Llama-2 shapes (Touvron et al. 2023, table 1 / the released config.json files).
PRESETS: dict[str, ModelShape] = {
    "7B": ModelShape(4096, 11008, 32, 32, 32, 128, 32000, name="Llama-2-7B"),
    "13B": ModelShape(5120, 13824, 40, 40, 40, 128, 32000, name="Llama-2-13B"),
    "70B": ModelShape(8192, 28672, 80, 64, 8, 128, 32000, name="Llama-2-70B"),
}


@dataclass
class MemoryEstimate:
    """Peak memory of one training step, broken down, and the compute per token.

    All sizes are bytes. ``peak`` is the largest live total over the step; the components are
    what is live at that moment or, for activations, the saved-for-backward total.

    Attributes:
        method: "full", "lora" or "qlora".
        model: the model shape's name.
        weights: model parameters (and adapter parameters) as stored.
        gradients: parameter gradients of the trainable parameters.
        optimizer_states: optimizer state tensors.
        activations: tensors saved for backward at the end of the forward pass.
        transient: the largest temporary on top of the above at the peak moment (logit gradients,
            optimizer update temporaries, a recomputed layer under gradient checkpointing).
        peak: estimated peak of live tensor bytes during the step.
        peak_phase: which phase sets the peak.
        at_peak: what is live at the peak (weights, optimizer states, gradients, activations,
            transient); sums to ``peak``.
        trainable_params: parameters updated by the optimizer.
        total_params: all parameters (base + adapter).
        flops_per_token: training FLOPs (forward + backward) per token.
        settings: the step the estimate is for (batch size, sequence length, precision, optimizer, ...).
        assumptions: the modelling choices, in words.
    """

    method: str
    model: str
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    transient: int
    peak: int
    peak_phase: str
    at_peak: dict[str, int]
    trainable_params: int
    total_params: int
    flops_per_token: float
    settings: dict[str, Any] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)


def load_shape(model: ModelShape | dict[str, Any] | str | Path) -> ModelShape:
    """Resolve a preset name ("7B", "13B", "70B"), a config dict, a config.json, a model directory or a
    ``.gguf`` file ("default" / "embedded": the embedded model).

    Raises:
        FileNotFoundError: if the string is neither a preset nor an existing path, or a directory
            has no config.json.
        ValueError: if the config is not a valid JSON object of a Llama-style model (the file is
            named).
    """
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, dict):
        return ModelShape.from_config(model)
    key = str(model)
    if key.upper() in PRESETS:
        return PRESETS[key.upper()]
    if key in ("default", "embedded"):
        from lorakit.analysis.weights import load_config

        return ModelShape.from_config(load_config(None), name="embedded default model")
    path = Path(key)
    if not path.exists():
        raise FileNotFoundError(f"model {key!r}: not a preset ({', '.join(PRESETS)}) and no such path")
    if path.is_file() and path.suffix == ".gguf":
        from lorakit.analysis.weights import load_config

        return ModelShape.from_config(load_config(path), name=path.name)
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.is_file():
        raise FileNotFoundError(f"model directory {key!r} has no config.json")
    from lorakit.config import read_json_object

    return ModelShape.from_config(read_json_object(cfg_path, bom=False), name=path.name or key)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def rank_above_width(shape: ModelShape, r: int, target_modules: tuple[str, ...] | list[str] | str) -> list[str]:
    """Targeted projections narrower than ``r`` (min(out, in) < r), as "name (min N)": ΔW there
    cannot reach rank r, yet r·(in + out) parameters are trained (as lorakit train warns)."""
    shapes = shape.linear_shapes()
    return [f"{t} (min {min(shapes[t])})" for t in _expand_targets(target_modules) if t in shapes and r > min(shapes[t])]


def _expand_targets(target_modules: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    """``target_modules`` as a tuple of projection names; "all-linear" (lorakit train's default) is
    every projection of the decoder layers."""
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if "all-linear" not in names:
        return tuple(names)
    # (as lorakit train and recommend read it: all-linear among other names adds every projection)
    return tuple(dict.fromkeys([*LINEAR_NAMES, *(n for n in names if n != "all-linear")]))


def check_sizes(**values: Any) -> None:
    """Each value an integer >= 1 (1.5 and True were taken), or a ValueError naming it."""
    for label, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be an integer >= 1, got {value!r}")


def estimate_memory(
    model: ModelShape | dict[str, Any] | str | Path,
    method: str = "lora",
    batch_size: int = 1,
    seq_len: int = 512,
    precision: str = "bf16",
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    r: int = 8,
    target_modules: tuple[str, ...] | list[str] = ("q_proj", "v_proj"),
    attention: str = "sdpa",
    optimizer_impl: str = "per-tensor",
    state_precision: str | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory and FLOPs of one training step.

    Args:
        model: a :class:`ModelShape`, a preset name ("7B", "13B", "70B"), a config dict, or a
            path to a config.json / model directory.
        method: "full" (all parameters train), "lora" (adapters on ``target_modules``, base
            frozen) or "qlora" (LoRA over an NF4 base with double quantisation).
        batch_size: sequences per step, B.
        seq_len: tokens per sequence, T.
        precision: "fp32"; "bf16"/"fp16" (weights, gradients, activations and optimizer states
            in that dtype, as ``torch.optim`` keeps states in the parameter dtype); "mixed" (fp32
            trainable weights, gradients and states, 16-bit activations under autocast, frozen
            base weights in 16-bit). LoRA adapters, their gradients and states are fp32 in every
            case (lorakit and PEFT keep adapters fp32 over a 16-bit base). QLoRA computes in 16-bit.
        optimizer: "adamw" (two states), "sgd" (no momentum, no state) or "adamw8bit"
            (bitsandbytes blockwise 8-bit states).
        gradient_checkpointing: recompute each decoder layer in backward, keeping only its input.
        r: LoRA rank.
        target_modules: LoRA targets among q/k/v/o_proj, gate/up/down_proj.
        attention: "sdpa" (flash-style, no T x T matrix kept) or "eager".
        optimizer_impl: "per-tensor" (torch's CPU default), "foreach" (torch's CUDA default:
            temporaries the size of all trainable parameters) or "fused".
        state_precision: dtype of AdamW's two moments, "fp32" / "bf16" / "fp16"; default: the
            trainable weights' dtype (what ``torch.optim.AdamW`` does).

    Returns:
        A :class:`MemoryEstimate`.

    Raises:
        ValueError: on an unknown choice, a non-positive size, or an unknown target module.
    """
    shape = load_shape(model)
    _check_choice("method", method, METHODS)
    _check_choice("precision", precision, PRECISIONS)
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_choice("attention", attention, ATTENTIONS)
    _check_choice("optimizer_impl", optimizer_impl, OPTIMIZER_IMPLS)
    if state_precision is not None:
        _check_choice("state_precision", state_precision, ("fp32", "bf16", "fp16"))
    check_sizes(batch_size=batch_size, seq_len=seq_len, r=r)
    if state_precision is not None and optimizer != "adamw":
        raise ValueError(f"state_precision is the dtype of AdamW's moments; optimizer {optimizer!r} "
                         + ("keeps its states in 8 bits" if optimizer == "adamw8bit" else "keeps no state"))
    targets = _expand_targets(target_modules)
    unknown = [t for t in targets if t not in LINEAR_NAMES]
    if method != "full" and (unknown or not targets):
        raise ValueError(f"target_modules must be among {', '.join(LINEAR_NAMES)}, got {list(targets)!r}")

    s = shape
    h, f, L, V = s.hidden_size, s.intermediate_size, s.num_layers, s.vocab_size
    hq, hkv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    N = batch_size * seq_len
    half = 2
    # bytes per element: activations (act), trainable weights/grads (wt), frozen base (base)
    act = 4 if precision == "fp32" else half
    if method == "qlora":
        act = half
    wt = 4 if precision in ("fp32", "mixed") else half
    if method != "full":
        wt = 4  # adapters stay fp32 over a 16-bit base (lorakit, and PEFT's autocast_adapter_dtype)
    base = 4 if precision == "fp32" else half
    lora = method != "full"
    assumptions: list[str] = []

    # ---- parameters --------------------------------------------------------------------------
    P = s.total_params()
    P_lora = s.lora_params(r, targets) if lora else 0
    trainable = P if not lora else P_lora
    if method == "full":
        weights = P * wt
        largest = max(s.embedding_params(), max(o * i for o, i in s.linear_shapes().values()))
    else:
        quantised = L * sum(o * i for o, i in s.linear_shapes().values()) if method == "qlora" else 0
        weights = int((P - quantised) * base + quantised * NF4_BYTES_PER_PARAM) + P_lora * wt
        largest = max(r * i if n in targets else 0 for n, (o, i) in s.linear_shapes().items())
        largest = max(largest, max(o * r if n in targets else 0 for n, (o, i) in s.linear_shapes().items()))
        if method == "qlora":
            assumptions.append("QLoRA: layer linears in NF4 with double quantisation (4.127 bits/param); "
                               "embeddings, norms and lm_head in 16-bit")
    gradients = trainable * wt
    state_bytes = wt if state_precision is None else (4 if state_precision == "fp32" else half)
    if optimizer == "adamw":
        states = 2 * trainable * state_bytes
    elif optimizer == "adamw8bit":
        states = int(2 * trainable * INT8_STATE_BYTES)
    else:
        states = 0

    # ---- saved activations per decoder layer --------------------------------------------------
    def norm_bytes(weight_trains: bool) -> int:
        # RMSNorm upcasts to fp32 and saves that input; x * weight saves the normalised tensor
        # only when the weight needs a gradient (autograd saves an operand only for the other's grad).
        return N * h * 4 + (N * h * act if weight_trains else 0) + N * 4

    def layer_bytes(first: bool) -> int:
        trains = lambda name: (not lora) or name in targets  # noqa: E731
        # Under LoRA nothing below the first adapter needs a gradient: layer 0's input norm and
        # frozen projections record nothing (unless checkpointing forces input gradients).
        input_needs_grad = (not lora) or (not first) or gradient_checkpointing
        n = 0
        if input_needs_grad:
            n += norm_bytes(not lora)
        if any(trains(t) for t in ATTN_IN):
            n += N * h * act  # shared input of q/k/v
        if lora:
            n += sum(N * r * act for t in targets)  # rank-r intermediates (lora_B's input)
        n += N * hq * act + 2 * N * hkv * act  # rotated q, rotated k, v (SDPA keeps all three)
        n += N * hq * act + N * s.num_heads * 4  # attention output + log-sum-exp
        if attention == "eager":
            # probabilities B*heads*T*T; repeat_kv copies of k and v when grouped
            n += batch_size * s.num_heads * seq_len * seq_len * act
            if s.num_kv_heads != s.num_heads:
                n += 2 * N * hq * act - 2 * N * hkv * act
            n -= N * s.num_heads * 4
        if trains("o_proj") and attention == "eager":
            n += N * hq * act  # the transposed-contiguous copy that o_proj saves
        n += norm_bytes(not lora)  # post-attention norm: its input always needs grad by now
        if any(trains(t) for t in MLP_IN):
            n += N * h * act
        n += 3 * N * f * act  # gate, silu(gate), up
        if trains("down_proj"):
            n += N * f * act
        return n

    layer_first, layer_rest = layer_bytes(True), layer_bytes(False)
    head_acts = norm_bytes(not lora) + (N * h * act if not lora else 0)  # final norm; lm_head input
    logits_b = N * V * act
    lsm = N * V * 4  # log_softmax output, fp32 (transformers upcasts logits for the loss)
    head_acts += lsm

    # per-layer parameter gradient bytes, for the backward replay
    g_layer = (s.layer_params() if not lora else P_lora // L) * wt
    g_head = (s.head_params() * wt) if not lora else 0
    g_embed = (s.embedding_params() * wt) if not lora else 0

    if gradient_checkpointing:
        # Each layer keeps its input; the head still keeps its activations.
        saved_layers = [N * h * act] * L
        recompute = layer_rest
        assumptions.append("gradient checkpointing per decoder layer: one layer's activations are "
                           "recomputed at a time during backward")
    else:
        saved_layers = [layer_first] + [layer_rest] * (L - 1)
        recompute = 0
    activations = sum(saved_layers) + head_acts + N * 8  # + token ids / labels (int64)

    fixed = weights + states
    if precision == "mixed" and method == "full":
        # autocast makes a 16-bit copy of each matmul weight in the forward, which that matmul saves
        # for its backward; with backward outside autocast (HF Trainer, accelerate) a layer's copies
        # are freed once its backward is done (not kept for the whole step: 11% over on a measured step)
        copies_layer = sum(o * i for o, i in s.linear_shapes().values()) * half
        copies_head = V * h * half
        assumptions.append("mixed precision: autocast's 16-bit copy of each matmul weight lives from the "
                           "forward to that layer's backward (backward outside autocast, as HF Trainer runs it)")
    else:
        copies_layer = copies_head = 0
    fixed_fwd_extra = L * copies_layer + copies_head

    # Each phase: (gradients live, activations live, temporaries on top).
    phases: dict[str, tuple[int, int, int]] = {}
    acts_fwd = activations + fixed_fwd_extra
    # end of forward, inside the loss: logits (and their fp32 upcast when 16-bit) + log_softmax
    upcast = N * V * 4 if act != 4 else 0
    phases["forward (loss)"] = (0, acts_fwd, logits_b + upcast)
    # backward at the loss: nll grad and log_softmax grad, both vocabulary-sized fp32
    phases["backward (loss)"] = (0, acts_fwd, 2 * N * V * 4)
    # then lm_head's backward: the log-softmax gradient, its 16-bit cast, lm_head's weight gradient
    lm_grad = (V * h * wt) if not lora else 0
    cast_back = N * V * act if act != 4 else 0
    phases["backward (lm_head)"] = (lm_grad, acts_fwd - lsm, N * V * 4 + cast_back + N * h * act)
    # backward through the layers, top down: activations of layers below stay, gradients above exist
    grads_so_far = g_head + (g_embed if s.tie_word_embeddings else 0)
    live_acts = sum(saved_layers)
    mlp_transient = 3 * N * f * act + N * h * act
    if method == "qlora":
        # an NF4 layer's forward and backward each rebuild its dense weight in the compute dtype, in
        # chunks of 2**20 weights (fp32 levels and int32 indices: 6 bytes each) -> the largest layer
        biggest = max(o * i for o, i in s.linear_shapes().values())
        mlp_transient += biggest * half + min(biggest, 1 << 20) * 6
        assumptions.append("QLoRA: a layer's dense weight is rebuilt from NF4 for its forward and backward "
                           "(the largest one counted at the peak)")
    best_layer = (0, 0, 0)
    for i in reversed(range(L)):
        candidate = (grads_so_far + g_layer, live_acts + (i + 1) * copies_layer, mlp_transient + recompute)
        if sum(candidate) > sum(best_layer):
            best_layer = candidate
        live_acts -= saved_layers[i]
        grads_so_far += g_layer
    phases["backward (layers)"] = best_layer
    # optimizer step: all gradients + the update's temporaries
    if optimizer in ("sgd", "adamw8bit") or optimizer_impl == "fused":  # bnb updates in a fused kernel
        opt_tmp = 0
    elif optimizer_impl == "foreach":
        opt_tmp = trainable * state_bytes
    else:
        opt_tmp = 2 * largest * state_bytes  # sqrt(v) and its division, one tensor at a time
    phases["optimizer step"] = (gradients, 0, opt_tmp)

    phase, (g_live, a_live, extra) = max(phases.items(), key=lambda kv: sum(kv[1]))
    peak = fixed + g_live + a_live + extra
    transient = extra
    at_peak = {"weights": int(weights), "optimizer_states": int(states), "gradients": int(g_live),
               "activations": int(a_live), "transient": int(extra)}

    # ---- compute ---------------------------------------------------------------------------------
    mm = L * sum(o * i for o, i in s.linear_shapes().values()) + V * h  # matmul params incl. lm_head
    attn_fwd = 2 * 2 * L * hq * (seq_len + 1) / 2  # QK^T and AV, causal: (T+1)/2 keys on average
    fwd = 2 * mm + attn_fwd
    if method == "full":
        flops = 3 * fwd
    else:
        # backward needs input gradients through frozen weights (one more matmul pass) but no
        # weight gradients; attention backward is ~2x its forward; adapters cost 6 FLOPs/param.
        flops = 2 * (2 * mm) + 3 * attn_fwd + 6 * P_lora
    if gradient_checkpointing:
        flops += fwd
    assumptions += [
        f"{batch_size} x {seq_len} tokens, precision {precision}, optimizer {optimizer} ({optimizer_impl}"
        + (f", {state_precision} states)" if state_precision else ")"),
        "zero_grad(set_to_none=True); the model output is dropped after .loss",
        f"{attention} attention without a padding mask; no dropout",
        "counts live tensor bytes (what torch allocates), not allocator caching or CUDA context",
    ]
    return MemoryEstimate(
        method=method,
        model=s.name,
        weights=int(weights),
        gradients=int(gradients),
        optimizer_states=int(states),
        activations=int(activations),
        transient=int(transient),
        peak=int(peak),
        peak_phase=phase,
        at_peak=at_peak,
        trainable_params=int(trainable),
        total_params=int(P + P_lora),
        flops_per_token=float(flops),
        settings=dict(batch_size=batch_size, seq_len=seq_len, precision=precision, optimizer=optimizer,
                      state_precision=state_precision,
                      gradient_checkpointing=gradient_checkpointing, r=r, target_modules=list(targets),
                      attention=attention, optimizer_impl=optimizer_impl),
        assumptions=assumptions,
    )


def compare_methods(model: ModelShape | dict[str, Any] | str | Path, **kwargs: Any) -> list[MemoryEstimate]:
    """Estimates for full fine-tuning, LoRA and QLoRA with the same settings (``kwargs`` as in
    :func:`estimate_memory`, without ``method``)."""
    return [estimate_memory(model, method=m, **kwargs) for m in METHODS]


def gib(n: float) -> float:
    """Bytes to GiB."""
    return n / 2**30


def human(n: float) -> str:
    """Bytes as a short human string (KiB ... GiB)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


__all__ = [
    "ModelShape", "MemoryEstimate", "PRESETS", "estimate_memory", "compare_methods", "load_shape",
    "human", "gib",
]
