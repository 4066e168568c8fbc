"""LoraConfig: the hyper-parameters of one adapter, with PEFT's field names and meanings.

The same object is written to ``adapter_config.json`` so that an adapter saved by lorakit loads in
Hugging Face PEFT (and from there in vLLM or llama.cpp's converter), and the other way round.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_NAME = "adapter_config.json"

# Keys PEFT writes that do not change what a loaded adapter computes (bookkeeping, how it was
# initialised or trained, runtime options); they are accepted on load and ignored.
_IGNORED_PEFT_KEYS = frozenset({
    "peft_type", "peft_version", "auto_mapping", "revision", "loftq_config", "megatron_config",
    "megatron_core", "eva_config", "corda_config", "lora_ga_config", "velora_config", "runtime_config",
    "qalora_group_size", "ensure_weight_tying",
})

# PEFT 0.21's init_lora_weights strings that lorakit makes no adapter with. None: the initialisation
# leaves the base weight as it is (the adapter's own tensors carry everything), so an adapter made
# with it loads as plain LoRA. Otherwise PEFT rewrote the base weight from data lorakit does not have,
# and the text names that initialisation (PiSSA and OLoRA, which lorakit recomputes exactly, are
# handled on load in lorakit.io).
PEFT_ONLY_INITS: dict[str, str | None] = {
    "eva": None, "orthogonal": None, "mica": None,
    "corda": "CorDA (a decomposition by the training data's covariance)",
    "lora_ga": "LoRA-GA (an initialisation from the training data's gradients)",
    "loftq": "LoftQ (a quantised residual, recomputed on load by PEFT with bitsandbytes)",
}
_RESIDUAL_INITS = {name: what for name, what in PEFT_ONLY_INITS.items() if what is not None}
# the strings that load as plain LoRA: PEFT's "gaussian" (lorakit makes it too) and the base-keeping above
_BASE_KEEPING_PEFT_INITS = frozenset({"gaussian"} | {name for name, what in PEFT_ONLY_INITS.items() if what is None})

# PEFT fields that, when set, make an adapter compute something plain LoRA does not (or lay out its
# tensors differently). lorakit implements none of them, so an adapter that sets one is refused with
# the field named, instead of loading as the plain LoRA it is not. {field: what it enables}
_UNSUPPORTED_PEFT_FIELDS = {
    "alora_invocation_tokens": "activated LoRA (aLoRA: the adapter acts only from its invocation tokens on)",
    "use_qalora": "QA-LoRA (pooled inputs on a GPTQ base)",
    "lora_bias": "a trainable bias on LoRA B",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "replicated decoder layers",
    "target_parameters": "LoRA on bare parameters (e.g. MoE experts)",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "KaSA (a learned singular-value diagonal between A and B)",
    "monteclora_config": "MonteCLoRA (Monte Carlo sampling of the adapters)",
}

_BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class LoraConfig:
    """Hyper-parameters of one LoRA adapter (PEFT's ``LoraConfig`` field names).

    The update added to a frozen weight W is ``ΔW = scaling · B @ A`` with ``A: (r, in)``,
    ``B: (out, r)`` and ``scaling = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA).

    Args:
        r: Rank of the update (the inner dimension of B @ A). Must be >= 1.
        lora_alpha: Numerator of the scaling factor.
        lora_dropout: Dropout probability applied to the LoRA branch's input during training.
        target_modules: Which modules get an adapter. A list matches a module whose full name equals
            an entry or ends with ``"." + entry``; a string is a regex full-matched against the full
            name; ``"all-linear"`` is every Linear / GPT-2 Conv1D except the output head.
        exclude_modules: Modules never to target (same matching rules as ``target_modules``).
        layers_to_transform: Only target modules inside these layer indices (with ``target_modules``
            as a list, as in PEFT; an entry that is a module's full name, such as ``"lm_head"``,
            targets that module whatever its layer, as PEFT's matching does).
        layers_pattern: Name of the layer list (e.g. ``"layers"``, ``"h"``) the indices refer to;
            needs ``layers_to_transform``.
        rank_pattern: ``{module-name pattern: r}`` overriding ``r`` for matching modules.
        alpha_pattern: ``{module-name pattern: alpha}`` overriding ``lora_alpha``.
        bias: Which biases train: ``"none"``, ``"all"`` or ``"lora_only"`` (biases of targeted layers).
        modules_to_save: Modules (besides the adapters) that are fully trained and saved, e.g. a head.
            As in PEFT, an entry names every module whose full name ends with it (a plain suffix:
            ``"classifier"`` also names ``pre_classifier``); a string is a regex full-matched.
        init_lora_weights: ``True`` (A kaiming-uniform(a=√5), B = 0; on an Embedding the other way
            round, A = 0 and B normal, as PEFT), ``False`` (both random: the
            adapter changes the output from the start; for tests), ``"gaussian"`` (A normal with std 1/r),
            or a variant's initialisation name (e.g. ``"pissa"``) where that variant is installed.
        use_rslora: Use rank-stabilised scaling ``lora_alpha / sqrt(r)`` (Kalajdzievski 2023).
        use_dora: Weight-decomposed LoRA (Liu et al. 2024), where the DoRA variant is installed.
        fan_in_fan_out: True when the base weight is stored (in, out), as in GPT-2's Conv1D. lorakit
            detects Conv1D itself; this field is kept for PEFT compatibility.
        task_type: PEFT's task tag (e.g. ``"CAUSAL_LM"``). As in PEFT, ``"SEQ_CLS"`` and
            ``"TOKEN_CLS"`` add the heads ``classifier`` and ``score``, ``"QUESTION_ANS"`` adds
            ``qa_outputs``, to ``modules_to_save`` (those the model has).
        base_model_name_or_path: Where the base model came from; informational.
        inference_mode: Written by PEFT; True means the adapter loads (and ``get_lora_model``
            makes it) frozen.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: str = "none"
    modules_to_save: list[str] | str | None = None
    init_lora_weights: bool | str = True
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise ValueError(f"LoraConfig.lora_alpha must be a number, got {self.lora_alpha!r}")
        if not math.isfinite(self.lora_alpha):
            raise ValueError(f"LoraConfig.lora_alpha must be finite, got {self.lora_alpha!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0.0 <= self.lora_dropout <= 1.0:
            # (a string passed the old float() check and was saved as "0.1", which PEFT cannot load)
            raise ValueError(f"LoraConfig.lora_dropout must be a number in [0, 1], got {self.lora_dropout!r}")
        self.lora_dropout = float(self.lora_dropout)
        for flag in ("use_rslora", "use_dora", "fan_in_fan_out", "inference_mode"):
            if not isinstance(getattr(self, flag), bool):  # ("no" turned DoRA on: a string is true)
                raise TypeError(f"LoraConfig.{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.bias not in _BIAS_CHOICES:
            raise ValueError(f"LoraConfig.bias must be one of {_BIAS_CHOICES}, got {self.bias!r}")
        # Copies, so that nothing lorakit does later can edit the caller's lists and dicts.
        for name in ("target_modules", "exclude_modules", "layers_pattern", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                value = sorted(value)
            if isinstance(value, list):
                if not all(isinstance(v, str) for v in value):
                    raise TypeError(f"LoraConfig.{name} must hold strings, got {value!r}")
                value = list(value)
            elif value is not None and not isinstance(value, str):
                raise TypeError(f"LoraConfig.{name} must be a list of names or a string, got {value!r}")
            setattr(self, name, value)
        if isinstance(self.target_modules, list) and any(t.lower() == "all-linear" for t in self.target_modules):
            # (in a list it names a module, as in PEFT, and matches none: "all-linear,embed_tokens" given to
            # lorakit train targeted embed_tokens alone, silently)
            raise ValueError(f"LoraConfig.target_modules: 'all-linear' is a value of its own, not a list entry (got "
                             f"{self.target_modules!r}): give target_modules='all-linear', or list every module by "
                             "name (q_proj, k_proj, ..., down_proj, embed_tokens)")
        if isinstance(self.layers_to_transform, (tuple, range)):
            self.layers_to_transform = list(self.layers_to_transform)
        layers = self.layers_to_transform
        if layers is not None and not (
                (isinstance(layers, int) and not isinstance(layers, bool))
                or (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers))):
            raise TypeError(f"LoraConfig.layers_to_transform must be a layer index or a list of them, got {layers!r}")
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            # (as in PEFT, which refuses such a config: a regex names the layers itself)
            which = "layers_to_transform" if self.layers_to_transform is not None else "layers_pattern"
            raise ValueError(f"LoraConfig.{which} cannot be combined with target_modules given as a string "
                             f"({self.target_modules!r}); name the layers in the regex, or give target_modules as a list")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"LoraConfig.layers_pattern={self.layers_pattern!r} needs layers_to_transform "
                             f"(the layer indices it refers to)")
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"LoraConfig.{name} must be a dict of module pattern -> value, got {value!r}")
            if any(not isinstance(k, str) or not k for k in value or {}):
                raise TypeError(f"LoraConfig.{name} keys must be module names or regexes, got {list(value)!r}")
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        # regexes are compiled here, so that a bad one names its field (not a bare re.error from deep in
        # the matcher)
        # (each as the matcher uses it: a key is placed inside a larger pattern, where "(?i)q" fails)
        regexes = [("target_modules", self.target_modules, "{}"), ("exclude_modules", self.exclude_modules, "{}"),
                   ("modules_to_save", self.modules_to_save, "{}")]
        regexes += [(f"rank_pattern key {k!r}", k, PATTERN_KEY_REGEX) for k in self.rank_pattern]
        regexes += [(f"alpha_pattern key {k!r}", k, PATTERN_KEY_REGEX) for k in self.alpha_pattern]
        layers = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern or []
        regexes += [("layers_pattern", p, LAYERS_PATTERN_REGEX) for p in layers]
        for what, pattern, used_as in regexes:
            if isinstance(pattern, str):
                try:
                    re.compile(used_as.format(pattern))
                except re.error as exc:
                    raise ValueError(f"LoraConfig.{what} is not a valid regular expression: {exc}") from None
        for key, value in self.rank_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {value!r}")
        for key, value in self.alpha_pattern.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"LoraConfig.alpha_pattern[{key!r}] must be a finite number, got {value!r}")
        if not (isinstance(self.init_lora_weights, bool) or isinstance(self.init_lora_weights, str)):
            raise TypeError(f"LoraConfig.init_lora_weights must be a bool or a string, got {self.init_lora_weights!r}")
        if isinstance(self.init_lora_weights, str):
            # matched in any case here, but PEFT reads "pissa..." only in lower case: saved as it reads it
            self.init_lora_weights = self.init_lora_weights.lower()
        if isinstance(self.init_lora_weights, str) and self.init_lora_weights not in _BASE_KEEPING_PEFT_INITS:
            from lorakit.variants import get_init_method

            try:
                get_init_method(self.init_lora_weights)
            except ValueError as exc:  # (a config read from a file with one of these was refused before)
                raise ValueError(f"LoraConfig.init_lora_weights: {exc}") from None

    # ---- per-module values -------------------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        """Rank of the adapter on ``module_name`` (``rank_pattern`` wins over ``r``)."""
        key = _pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        """Alpha of the adapter on ``module_name`` (``alpha_pattern`` wins over ``lora_alpha``)."""
        key = _pattern_key(self.alpha_pattern, module_name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def scaling_for(self, module_name: str) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023, eq. 5)."""
        r = self.rank_for(module_name)
        alpha = self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # ---- (de)serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content, as PEFT writes it."""
        data = asdict(self)
        data["peft_type"] = "LORA"
        if isinstance(self.target_modules, list):
            data["target_modules"] = sorted(set(self.target_modules))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> "LoraConfig":
        """Build a config from ``adapter_config.json`` content, refusing what PEFT would guess.

        Raises:
            ValueError: the config is not a LoRA config, lacks ``r`` or ``lora_alpha``, or holds a
                field lorakit does not know (the field is named).
        """
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, found {type(data).__name__}")
        import enum

        # (a PEFT config's own to_dict() holds its enums, PeftType.LORA and TaskType, and sets)
        data = {k: v.value if isinstance(v, enum.Enum) else sorted(v) if isinstance(v, (set, frozenset)) else v
                for k, v in data.items()}
        peft_type = data.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise ValueError(f"{source}: peft_type is {peft_type!r}; lorakit reads LoRA adapters only ('LORA')")
        for required in ("r", "lora_alpha"):
            if required not in data:
                raise ValueError(f"{source}: required field {required!r} is missing (PEFT would silently use a default; lorakit does not)")
        for key, what in _UNSUPPORTED_PEFT_FIELDS.items():
            value = data.get(key)
            if value not in (None, False, [], {}):
                raise ValueError(f"{source}: {key}={value!r} asks for PEFT's {what}, which lorakit does not "
                                 f"implement; loaded as plain LoRA it would compute something else, so it is refused")
        init = data.get("init_lora_weights")
        if isinstance(init, str) and init.lower() in _RESIDUAL_INITS:
            raise ValueError(f"{source}: init_lora_weights={init!r}: {_RESIDUAL_INITS[init.lower()]} rewrote the base "
                             "weight to a residual W - s*B0*A0 that the adapter is trained against and that lorakit "
                             "cannot recompute from the file (loaded on the original base it would compute something "
                             "else); save it converted with PEFT (save_pretrained(..., "
                             "path_initial_model_for_weight_conversion=...)) and load that")
        if isinstance(init, str) and init.lower() not in _BASE_KEEPING_PEFT_INITS:
            from lorakit.variants import get_init_method

            try:
                get_init_method(init)  # PiSSA, OLoRA, pissa_niter_K, and any registered method
            except ValueError:
                raise ValueError(f"{source}: init_lora_weights={init!r} is an initialisation neither PEFT 0.21 nor "
                                 "lorakit knows; whether it rewrote the base weight (as PiSSA does) cannot be told, "
                                 "so the adapter is refused (loaded as plain LoRA it could compute something "
                                 "else)") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in data if k not in known and k not in _IGNORED_PEFT_KEYS and k not in _UNSUPPORTED_PEFT_FIELDS)
        # A field of a newer PEFT left at an "off" value (None, False, empty) asks for nothing: it is
        # ignored with a warning, as PEFT drops keys it does not know. Set to anything else it may
        # change what the adapter computes, so it is refused.
        off = [k for k in unknown if data[k] is None or data[k] is False or data[k] in ([], {}, "")]
        if off:
            import warnings

            warnings.warn(f"{source}: ignoring unknown field(s) {off}, set to no value (from a newer PEFT?)", stacklevel=3)
        unknown = [k for k in unknown if k not in off]
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown} set to {[data[k] for k in unknown]}; lorakit "
                             f"knows {sorted(known)} and would not know what they change")
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from None

    def save(self, directory: str | Path) -> Path:
        """Write ``adapter_config.json`` into ``directory`` atomically; returns its path."""
        from lorakit.io import atomic_write_bytes

        path = Path(directory) / CONFIG_NAME
        # Fields sorted, but not the patterns inside rank_pattern / alpha_pattern: where several match
        # a module the first one wins, so their order is part of the adapter (PEFT's own save sorts
        # them, which can change the ranks or scales an adapter loads with).
        data = dict(sorted(self.to_dict().items()))
        atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "LoraConfig":
        """Read ``adapter_config.json`` from an adapter directory.

        Raises:
            FileNotFoundError: the directory or its config file does not exist.
            ValueError: the file is not valid JSON or not a usable LoRA config.
        """
        path = Path(directory) / CONFIG_NAME
        if not Path(directory).is_dir():
            if Path(directory).exists():  # (a file was "not found")
                raise NotADirectoryError(f"{str(directory)!r} is a file; give the adapter's directory (the one "
                                         f"holding {CONFIG_NAME} and adapter_model.safetensors)")
            raise FileNotFoundError(f"adapter directory not found: {directory}")
        if not path.is_file():
            inner = sorted(d.name for d in Path(directory).iterdir() if (d / CONFIG_NAME).is_file())
            hint = (f"; it holds adapters in subfolder(s) {inner} (where PEFT saves adapters not named 'default'): "
                    f"give one of those" if inner else "")
            raise FileNotFoundError(f"{path} not found: an adapter directory holds {CONFIG_NAME} and "
                                    f"adapter_model.safetensors{hint}")
        return cls.from_dict(read_json_object(path), source=str(path))


def read_json_object(path: str | Path, bom: bool = True) -> dict[str, Any]:
    """The JSON object in the file ``path`` (an adapter's or a run's metadata, a model's config.json);
    the one reader of such files in lorakit.

    Args:
        bom: Take a UTF-8 byte-order mark at the start (as an editor may write). False for files that
            transformers reads too (a model's config.json, a checkpoint index), since it refuses one.

    Raises:
        ValueError: naming the file, if it is not UTF-8 text, not valid JSON (or nested too deep to
            read) or holds something other than an object.
    """
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig" if bom else "utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except ValueError as exc:  # (an integer beyond Python's digit limit for conversion)
        raise ValueError(f"{path}: not readable JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deep to read)") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


#: How the matchers use a ``rank_pattern`` / ``alpha_pattern`` key and a ``layers_pattern`` (PEFT's
#: rules), also what ``LoraConfig`` compiles to check them.
PATTERN_KEY_REGEX = r"(.*\.)?({})$"
LAYERS_PATTERN_REGEX = r"(?:^|.*?\.){}\.(?P<idx>\d+)\."


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """First pattern in ``patterns`` that matches the end of ``module_name`` (PEFT's rule)."""
    for key in patterns:
        if re.match(PATTERN_KEY_REGEX.format(key), module_name):
            return key
    return None
