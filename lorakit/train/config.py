"""TrainConfig: every knob of ``lorakit train``, from YAML and/or command-line flags.

Precedence: dataclass defaults < ``--config`` YAML < flags given on the command line. The defaults
are sized for the demo: the embedded SmolLM2-135M-Instruct learning the bundled sentiment task on
a 2-core CPU in a few minutes.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

# One-line help for each field; ``lorakit train --help`` shows it with the field's default.
HELP: dict[str, str] = {
    "model": "base model: a local transformers model directory or a .gguf file; empty = the embedded "
    "SmolLM2-135M-Instruct",
    "data": "training data: a JSONL file, or 'rotten_tomatoes' (the bundled sentiment task)",
    "eval_data": "held-out JSONL for before/after evaluation; empty = the bundled task's held-out split "
    "when training on it, else none",
    "eval_samples": "evaluate on at most this many held-out examples (0 = all)",
    "output": "run directory; empty = runs/<task>-<method>-<timestamp>",
    "method": "'lora' (adapters only), 'qlora' (adapters on a 4-bit NF4 base) or 'full' (every weight: a baseline)",
    "use_rslora": "rank-stabilised scaling alpha/sqrt(r) (rsLoRA)",
    "use_dora": "weight-decomposed LoRA (DoRA): a learned magnitude per output channel",
    "init": "adapter initialisation: 'default' (A random, B zero), 'gaussian', 'pissa', 'pissa_niter_K' or 'olora'",
    "lora_plus_ratio": "LoRA+: learning rate of B = this ratio x that of A (0 = off; 16 is the paper's choice)",
    "rank": "LoRA rank r",
    "alpha": "LoRA alpha (the update is scaled by alpha/r)",
    "dropout": "dropout on the LoRA branch input (the base model's own dropout, e.g. GPT-2's 0.1, stays as its "
    "config sets it)",
    "target_modules": "modules to adapt: 'all-linear' (alone), a comma-separated list of names or dotted name ends "
    "(q_proj,self_attn.v_proj), or a regex (any of * + ? [ ] ( ) | ^ $ \\ { } makes it one) that must match "
    "the whole module name, e.g. '.*\\.(q|v)_proj'",
    "lr": "peak learning rate; empty = 1e-3 for lora, 5e-5 for full",
    "weight_decay": "AdamW weight decay, of matrices only (not of biases, norms or DoRA magnitudes)",
    "warmup_ratio": "fraction of the steps spent in linear warm-up before the cosine decay",
    "epochs": "passes over the training data (ignored when --max-steps is set)",
    "max_steps": "stop after this many optimizer steps (0 = use --epochs; sized for the CPU demo, and "
    "reset to 0 when --epochs is given without --max-steps)",
    "max_train_samples": "use only the first N training examples (0 = all)",
    "batch_size": "examples per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "max_length": "truncate sequences to this many tokens",
    "max_grad_norm": "clip the gradient norm to this value (0 = no clipping)",
    "seed": "random seed (data order, initialisation, dropout)",
    "precision": "'auto' (bf16 where the CPU supports it natively, else fp32), 'fp32' or 'bf16'; bf16 "
    "means bf16 base weights + fp32 adapters for lora, fp32 weights + bf16 autocast for full",
    "save_steps": "write a resumable checkpoint every N steps (0 = none during training; Ctrl-C saves one, "
    "and an adapter run checkpoints its last step before the final evaluation; a finished run keeps only "
    "its adapter)",
    "eval_steps": "compute the held-out loss every N steps (0 = only before and after)",
    "logging_steps": "without a progress bar (--no-progress, or stderr not a terminal), print a log line every N steps (0: none; every "
    "step is always written to log.jsonl)",
    "gradient_checkpointing": "recompute activations in the backward pass (less memory, slower)",
    "threads": "torch CPU threads (0 = auto: one per core, minus the cores other processes keep busy "
    "when training starts)",
}

# --init values: LoRA's own initialisations and the variants' (``pissa_niter_K`` with an integer K).
INIT_NAMES = ("default", "gaussian", "pissa", "pissa_niter_K", "olora")
_REGEX_CHARS = "*+?[]()|^$\\{}"
# Fields whose value is a path or name (None = the field's default meaning).
_TEXT_FIELDS = ("model", "data", "eval_data", "output")


def target_module_spec(target_modules: str) -> str | list[str]:
    """What ``--target-modules`` means: ``"all-linear"``, a regex string (any of ``* + ? [ ] ( ) | ^ $
    \\ { }`` makes it one), or a list of names / dotted name ends (comma-separated)."""
    if target_modules == "all-linear" or any(c in target_modules for c in _REGEX_CHARS):
        return target_modules
    return [t.strip() for t in target_modules.split(",") if t.strip()]


#: Options a resumed run cannot change: they define the model and its adapters (the checkpoint was
#: trained as that model), the optimizer's parameter groups, or which example the run continues at.
RESUME_FIXED = ("model", "method", "rank", "alpha", "target_modules", "use_rslora", "use_dora", "init",
                "lora_plus_ratio", "weight_decay", "data", "max_train_samples", "max_length", "batch_size",
                "grad_accum", "seed")


def _known_init(name: str) -> bool:
    key = name.lower()
    if key.startswith("pissa_niter_"):
        return key[len("pissa_niter_"):].isdigit()
    return key in INIT_NAMES


@dataclass
class TrainConfig:
    """Configuration of one training run (see ``HELP`` for each field's meaning).

    ``epochs`` counts only with ``max_steps=0``: ``TrainConfig(epochs=3)`` alone still stops at the
    default 150 steps (the CLI's ``--epochs`` and a YAML ``epochs:`` set ``max_steps`` to 0 for you).
    """

    model: str | None = None
    data: str | None = None
    eval_data: str | None = None
    eval_samples: int = 200
    output: str | None = None
    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    lora_plus_ratio: float = 0.0
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    epochs: float = 1.0
    max_steps: int = 150
    max_train_samples: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    max_grad_norm: float = 1.0
    seed: int = 0
    precision: str = "auto"
    save_steps: int = 50
    eval_steps: int = 0
    logging_steps: int = 10
    gradient_checkpointing: bool = False
    threads: int = 0
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.init, str):
            self.init = self.init.lower()  # "PiSSA" and "DEFAULT" mean what "pissa" and "default" do
        self.validate()

    def validate(self) -> None:
        """Check every value; raises ValueError naming the bad field and value."""
        if self.method not in ("lora", "qlora", "full"):
            raise ValueError(f"method must be 'lora', 'qlora' or 'full', got {self.method!r}")
        for name in _TEXT_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string (a path or name), got {value!r}")
        # Every number must be finite: nan passes comparisons like ``alpha <= 0`` unnoticed, and inf
        # turns into a non-finite loss or a step count that does not fit an int.
        for name in ("alpha", "dropout", "lora_plus_ratio", "lr", "weight_decay", "warmup_ratio", "epochs",
                     "max_grad_norm"):
            value = getattr(self, name)
            if name == "lr" and value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.lora_plus_ratio < 0:
            raise ValueError(f"lora_plus_ratio must be >= 0, got {self.lora_plus_ratio!r}")
        if not isinstance(self.init, str) or not _known_init(self.init):
            raise ValueError(f"init must be one of {', '.join(INIT_NAMES)} (K an integer, e.g. pissa_niter_4), "
                             f"got {self.init!r}")
        if self.method == "full" and (self.use_dora or self.use_rslora or self.lora_plus_ratio or self.init != "default"):
            raise ValueError("use_dora / use_rslora / lora_plus_ratio / init apply to --method lora or qlora, not full")
        if self.method == "qlora" and self.init not in ("default", "gaussian"):
            raise ValueError(f"init {self.init!r} cannot be combined with method 'qlora': PiSSA / OLoRA move the "
                             "principal part of each weight into the adapter and need the full-precision base "
                             "weights, which a 4-bit base no longer has; use --method lora, or init default / gaussian")
        if self.use_dora and self.init.lower() not in ("default", "gaussian"):
            raise ValueError(f"use_dora cannot be combined with init {self.init!r}: a PiSSA / OLoRA run is saved "
                             "as plain LoRA against the original base (convert_to_lora), which cannot express "
                             "DoRA's magnitude vector")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        positive = ("rank", "batch_size", "grad_accum", "max_length")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_steps", "save_steps", "eval_steps", "logging_steps", "eval_samples",
                     "max_train_samples", "threads", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.seed >= 2**63:  # (torch takes 64-bit seeds; each process of a torchrun run adds its rank)
            raise ValueError(f"seed must be below 2**63, got {self.seed!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm!r}")
        if not isinstance(self.target_modules, str) or not self.target_modules.strip(","):
            raise ValueError(f"target_modules must be a non-empty string, got {self.target_modules!r}")
        spec = target_module_spec(self.target_modules)
        if not spec:
            raise ValueError(f"target_modules {self.target_modules!r} names no module")
        if isinstance(spec, list) and "all-linear" in (t.lower() for t in spec):
            # (it trained embed_tokens alone: in a list, "all-linear" names a module, as in PEFT, and matches none)
            raise ValueError(f"target_modules {self.target_modules!r}: all-linear is a value of its own, not a list "
                             "entry; to add modules to it, list every projection by name "
                             "(q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,embed_tokens)")
        if isinstance(spec, str) and spec != "all-linear":
            try:
                re.compile(spec)
            except re.error as exc:
                raise ValueError(f"target_modules {spec!r} is not a valid regex ({exc}); for plain names, "
                                 "give a comma-separated list without regex characters") from None

    @property
    def learning_rate(self) -> float:
        """The effective peak learning rate (method-dependent default)."""
        if self.lr is not None:
            return self.lr
        return 5e-5 if self.method == "full" else 1e-3

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-serialisable dict of the fields (``extra`` left out)."""
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> TrainConfig:
        """Build a config from a dict, rejecting unknown keys (typos must not pass silently).

        Raises:
            ValueError: on an unknown key or a bad value.
        """
        known = {f.name for f in fields(cls)} - {"extra"}
        # YAML users may write flag spellings (batch-size) as well as field names (batch_size).
        norm = {str(k).replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(norm) - known)
        if unknown:
            raise ValueError(f"{where}: unknown training option(s) {unknown}; known: {sorted(known)}")
        for name, value in list(norm.items()):
            norm[name] = _coerce(name, value, where)
        if "epochs" in norm and "max_steps" not in norm:
            norm["max_steps"] = 0  # asking for epochs means "train for that many epochs"
        return cls(**norm)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """Read a YAML mapping of option -> value.

        Raises:
            FileNotFoundError: if the file is missing.
            ValueError: if it is not UTF-8 YAML, not a mapping, or holds unknown keys / bad values.
        """
        return cls.from_dict(read_yaml_mapping(path), where=str(path))

    def updated(self, **changes: Any) -> TrainConfig:
        """A copy with some fields replaced (validated again)."""
        d = self.to_dict()
        d.update(changes)
        return TrainConfig.from_dict(d)


def _coerce(name: str, value: Any, where: str) -> Any:
    """Convert YAML scalars to the field's type (YAML reads ``1e-3`` as a string)."""
    default = TrainConfig.__dataclass_fields__[name].default
    if value is None:
        return None
    if name == "target_modules" and isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if name in _TEXT_FIELDS or isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"{where}: {name} must be a string, got {value!r}")
        return value
    kind = type(default)
    if name == "lr":
        kind = float
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):  # (use_rslora: 2 is not a yes or no)
                raise ValueError
            return value
        if isinstance(value, bool):  # YAML's true is not a number (max_steps: true trained 1 step)
            raise ValueError
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {name} must be a {kind.__name__}, got {value!r}") from None
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping naming a key twice (PyYAML keeps the last value
    silently: ``rank: 8`` then ``rank: 64`` trained at 64)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"option {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | Path) -> dict[Any, Any]:
    """The mapping of option -> value in a YAML config file, as written (not yet checked as options).

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if it is not UTF-8 YAML, or not a mapping.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {str(path)!r} is a directory, not a YAML file")
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found")
    try:
        d = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_UniqueKeyLoader) or {}  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {problem}{where}") from None
    if not isinstance(d, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of option: value")
    return d
