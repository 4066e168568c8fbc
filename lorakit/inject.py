"""Injection: find the modules a config targets and wrap them in LoRA layers, in place.

Target matching follows PEFT's rules (so an adapter_config.json means the same thing in both
libraries), except that a pattern that matches nothing is an error here, not a silent skip, and that
a ``modules_to_save`` list entry keeps adapters off its module as a literal name (PEFT 0.21 puts the
entry into a regex unescaped there, so a name with regex characters in it could match more).
"""
from __future__ import annotations

import copy
import difflib
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import torch
from torch import nn

from lorakit.config import LAYERS_PATTERN_REGEX, LoraConfig, _pattern_key
from lorakit.layers import LAYER_TYPES, LoraLayer, lora_class_for
from lorakit.layers.guard import cast_print, same_up_to_cast
from lorakit.variants import variant_for

ALL_LINEAR = "all-linear"

#: Heads PEFT's task wrappers add to ``modules_to_save`` (PeftModelForSequenceClassification and
#: the like), so that an adapter of that task type trains, saves and loads its head in both libraries.
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}


def task_heads(config: LoraConfig) -> tuple[str, ...]:
    """The head names ``config.task_type`` adds to ``modules_to_save`` (PEFT's rule); () for others."""
    return TASK_HEADS.get(str(config.task_type).upper(), ()) if config.task_type else ()


def with_task_heads(config: LoraConfig) -> LoraConfig:
    """A copy of ``config`` whose ``modules_to_save`` lists the heads its task type adds (PEFT's task
    wrappers do this to the config they save, so a lorakit adapter of that type saves them too)."""
    config = copy.deepcopy(config)
    heads = task_heads(config)
    if heads and not isinstance(config.modules_to_save, str):
        present = list(config.modules_to_save or [])
        config.modules_to_save = present + [h for h in heads if h not in present]
    return config


@dataclass
class LoraState:
    """What lorakit remembers on a model it injected into (stored as ``model._lorakit``).

    Attributes:
        configs: adapter name -> the config it was created with (a private copy).
        active: names of the active adapters, in order (their updates are summed).
        trainable: names of the adapters whose parameters require grad.
        untied: adapter name -> targets whose tied weight a PiSSA / OLoRA init gave a copy of their own.
        ties: the tied weights merging untied (``untie_tied_for_merge``), one record per original
            weight, which ``retie`` restores once none of its holders has anything merged.
    """

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    trainable: set[str] = field(default_factory=set)
    untied: dict[str, list[str]] = field(default_factory=dict)
    ties: list[dict[str, Any]] = field(default_factory=list)


class ModulesToSave(nn.Module):
    """A module trained in full beside the adapters (``modules_to_save``, e.g. a classifier head).

    Each adapter gets its own trainable copy; the original is kept untouched so that disabling or
    unloading the adapter gives back exactly the base model.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.batch_context: Any = None  # shared mixed-batch context (lorakit.multi), set at injection

    def add_adapter(self, name: str) -> None:
        """Give adapter ``name`` its own copy of the original module and make it the active one."""
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        self.active_adapter = name

    def current(self) -> nn.Module:
        """The module forward uses now: the active adapter's copy, or the original when disabled."""
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The active adapter's trained copy (the original module when disabled or for other adapters);
        in a mixed-adapter batch, each row through its own adapter's copy."""
        plan = self.batch_context.plan if self.batch_context is not None else None
        if plan is not None and not self.disabled:  # mixed-adapter batch: each row its adapter's copy
            from lorakit.multi import _saved_module_mixed_forward

            return _saved_module_mixed_forward(self, plan, args, kwargs)
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("original_module", "modules_to_save", "disabled", "active_adapter", "batch_context"):
                raise  # not set up yet (e.g. during copying): never recurse
            # Let code that reads e.g. ``lm_head.weight`` see the module in use.
            return getattr(self.current(), name)


# ---- the state lorakit keeps on a model -------------------------------------------------------------

def check_model(model: Any) -> None:
    """A TypeError saying so if ``model`` is not an ``nn.Module`` (None, a path, a config: it was a
    bare AttributeError from deep inside)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a model (an nn.Module), got {type(model).__name__}")


def get_state(model: nn.Module, create: bool = False) -> LoraState | None:
    """The ``LoraState`` of ``model`` (None if lorakit never injected into it, unless ``create``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` (None, a path, a config: it was a bare
            AttributeError about ``__dict__``).
    """
    check_model(model)
    state = model.__dict__.get("_lorakit")
    if state is None and create:
        state = LoraState()
        model.__dict__["_lorakit"] = state
    return state


def require_state(model: nn.Module) -> LoraState:
    """Like ``get_state`` but raises a clear error for a model without adapters."""
    state = get_state(model)
    if state is None or not state.configs:
        raise ValueError("this model has no LoRA adapters (use get_lora_model or load_adapter first)")
    return state


def iter_lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Yield ``(module path, LoraLayer)`` for every LoRA layer in ``model``."""
    check_model(model)
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def lora_and_saved_modules(model: nn.Module) -> tuple[list[tuple[str, LoraLayer]], list[tuple[str, ModulesToSave]]]:
    """``(list(iter_lora_layers(model)), list(iter_saved_modules(model)))`` from one walk over the modules."""
    check_model(model)
    layers: list[tuple[str, LoraLayer]] = []
    wrappers: list[tuple[str, ModulesToSave]] = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            layers.append((name, module))
        if isinstance(module, ModulesToSave):
            wrappers.append((name, module))
    return layers, wrappers


def iter_saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    """Yield ``(module path, ModulesToSave)`` for every fully trained module in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def model_biases(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every bias the forward pass uses as the base model's own: what
    ``bias="all"`` trains and saves. Biases inside a ``modules_to_save`` wrapper are left out: the
    original module's is never used while the wrapper has an adapter, and each copy's belongs to
    its own adapter (trained and saved with the copy)."""
    inside = [p + "." for p, _ in iter_saved_modules(model)]
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] == "bias" and not any(name.startswith(w) for w in inside):
            yield name, p


# ---- matching ---------------------------------------------------------------------------------------

def ends_another(paths: list[str], names: list[str]) -> bool:
    """Whether one of ``paths`` is also the dotted end of another of ``names`` (``fc`` and
    ``block.fc``): a list entry or pattern key ``fc`` then selects both, as PEFT matches them."""
    ends = {".".join(parts[i:]) for parts in (n.split(".") for n in names) for i in range(1, len(parts))}
    return any(p in ends for p in paths)


def _name_matches(patterns: list[str] | frozenset[str] | str, name: str) -> bool:
    """PEFT's rule: a string is a regex full-matched; a list entry equals the name or a dotted suffix.

    A list is looked up as a set, once per dot of the name (give a frozenset to match many names
    against one list): testing every entry as a suffix took most of ``save_adapter``'s time on
    "all-linear" (whose check of PEFT's reading matches every module against 210 names)."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    entries = patterns if isinstance(patterns, frozenset) else frozenset(patterns)
    if name in entries:
        return True
    dot = name.find(".")
    while dot != -1:
        if name[dot + 1:] in entries:
            return True
        dot = name.find(".", dot + 1)
    return False


def _layer_index_ok(config: LoraConfig, name: str) -> bool:
    """``layers_to_transform`` / ``layers_pattern``: is ``name`` inside one of the chosen layers?"""
    wanted = config.layers_to_transform
    if wanted is None or (isinstance(wanted, list) and not wanted):
        return True
    patterns = config.layers_pattern
    if not patterns:
        # PEFT's rule: the first numbered segment after at least two others is the layer index
        # ("model.layers.3.mlp" -> 3; "layers.3.mlp" has none, so that module is not targeted).
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(LAYERS_PATTERN_REGEX.format(pattern), name)
            if match:
                break
    if not match:
        return False
    index = int(match.group("idx"))
    return index == wanted if isinstance(wanted, int) else index in wanted


def _linear_like_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _in_saved(entries: list[str] | str, name: str) -> bool:
    """Whether ``name`` is a ``modules_to_save`` module or inside one, by PEFT's rule for keeping
    adapters off them (an entry matches at a dotted boundary; a string is a regex on a prefix)."""
    if isinstance(entries, str):
        parts = name.split(".")
        return any(re.fullmatch(entries, ".".join(parts[:i])) for i in range(1, len(parts) + 1))
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in entries)


def _output_head_names(model: nn.Module, named: list[tuple[str, nn.Module]] | None = None) -> set[str]:
    """The names of the model's output head (``get_output_embeddings``); ``named``: the model's
    ``named_modules()`` as a list, where the caller has one."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None:
        return set()
    return {name for name, module in (model.named_modules() if named is None else named) if module is head}


def _inside_lora(name: str, wrappers: set[str]) -> bool:
    """Whether module ``name`` lies inside one of the modules named in ``wrappers`` (a proper
    prefix of its name ends where one of them does). A look-up per dot of the name: the test of
    every wrapper's prefix that it replaces took 1.2 of a ``save_adapter``'s 1.8 s (cProfile, three
    saves of the embedded model with r 16 on all linear layers: 210 wrappers by ~1,500 modules)."""
    dot = name.find(".")
    while dot != -1:
        if name[:dot] in wrappers:
            return True
        dot = name.find(".", dot + 1)
    return False


def find_target_modules(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the modules ``config`` targets in ``model`` (already-wrapped layers included).

    Raises:
        ValueError: ``target_modules`` is missing, matches nothing (the message lists the closest
            existing module names), or matches a module type that has no LoRA layer.
    """
    check_model(model)
    return _find_targets(model, config, list(model.named_modules()))


def _find_targets(model: nn.Module, config: LoraConfig, named: list[tuple[str, nn.Module]]) -> list[str]:
    """``find_target_modules`` on ``named``, the model's ``named_modules()`` (one walk over the modules
    for every step below, and for several calls on one model: ``target_modules_for_file``)."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"expected a lorakit LoraConfig, got {type(config).__name__}")
    if config.target_modules is None:
        raise ValueError("LoraConfig.target_modules is required, e.g. ['q_proj', 'v_proj'] or 'all-linear'")
    all_linear = isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR
    linear_types = _linear_like_types()
    heads = _output_head_names(model, named) if all_linear else set()
    if all_linear and not heads and str(config.task_type).upper() == "SEQ_CLS":
        # PEFT's rule for classification models: the top-level score / classifier head is not a target
        head = next((getattr(model, n) for n in ("score", "classifier") if isinstance(getattr(model, n, None), nn.Module)), None)
        heads = {n for n, m in named if head is not None and m is head}
    wrappers = {n for n, m in named if isinstance(m, (LoraLayer, ModulesToSave))}
    saved = config.modules_to_save
    # (lists as sets once, for the look-ups below: see _name_matches)
    targets = config.target_modules if isinstance(config.target_modules, str) else frozenset(config.target_modules)
    excluded = config.exclude_modules
    if excluded and not isinstance(excluded, str):
        excluded = frozenset(excluded)
    found: list[str] = []
    # nn.MultiheadAttention reads out_proj's weight itself (F.multi_head_attention_forward) and never
    # calls the module: a LoRA layer there would never run
    mha_out = {f"{n}.out_proj" if n else "out_proj" for n, m in named if isinstance(m, nn.MultiheadAttention)}
    for name, module in named:
        if not name or _inside_lora(name, wrappers):
            continue
        if excluded and _name_matches(excluded, name):
            continue
        if saved and _in_saved(saved, name):
            continue
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if all_linear:
            hit = isinstance(base, linear_types) and name not in heads
        else:
            hit = _name_matches(targets, name)
        # PEFT's rule: a list entry that is the module's full name targets it whatever its layer
        named_in_full = not isinstance(targets, str) and name in targets
        if not hit or not (named_in_full or _layer_index_ok(config, name)):
            continue
        if name in mha_out:  # (after exclude_modules and the layer checks: an excluded one is simply skipped)
            if all_linear:
                continue
            raise ValueError(f"target module {name!r} is the out_proj of an nn.MultiheadAttention, which uses its "
                             "weight directly and never calls it: a LoRA there would have no effect. Leave it out "
                             "of target_modules")
        if not isinstance(module, LoraLayer) and lora_class_for(module) is None:
            supported = sorted({c.__name__ for c in LAYER_TYPES})
            raise ValueError(
                f"target module {name!r} is a {type(module).__name__}, which has no LoRA layer; "
                f"supported types: {supported}. Name its Linear/Embedding/Conv children instead."
            )
        found.append(name)
    if not found:
        raise ValueError(_no_match_message(model, config))
    return found


def _check_patterns_match(config: LoraConfig, targets: list[str]) -> None:
    """A ``rank_pattern`` / ``alpha_pattern`` key that matches none of the targets is an error when
    creating an adapter (a typo silently left those modules at ``r`` / ``lora_alpha``; PEFT ignores
    such keys, and loading a file does too)."""
    for field_name in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field_name):
            if not any(_pattern_key({key: None}, name) for name in targets):
                leaves = sorted({n.rsplit(".", 1)[-1] for n in targets})
                close = difflib.get_close_matches(key, leaves + targets, n=5, cutoff=0.3)
                hint = f" Closest target names: {sorted(set(close))}." if close else ""
                raise ValueError(f"{field_name} key {key!r} matches none of the {len(targets)} target modules, so it "
                                 f"would change nothing.{hint} Target leaf names: {leaves[:20]}")


def _warn_unmatched_entries(config: LoraConfig, targets: list[str]) -> None:
    """Warn about ``target_modules`` list entries that matched no module while others did (all
    matching nothing is an error): a typo there ("v_prj") silently left those modules out. A warning,
    not an error, since one list often serves several architectures (q_proj / c_attn)."""
    entries = config.target_modules
    if isinstance(entries, str) or not entries:
        return
    unmatched = [e for e in entries if not any(n == e or n.endswith("." + e) for n in targets)]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in targets})
        warnings.warn(f"target_modules {unmatched} matched no module (the other entries matched {len(targets)} "
                      f"modules: {leaves[:10]}); a typo?", stacklevel=4)


def _no_match_message(model: nn.Module, config: LoraConfig) -> str:
    if config.exclude_modules or config.modules_to_save:
        try:  # would they match without the exclusions? then say so, not "matched no module"
            left_out = find_target_modules(model, replace(config, exclude_modules=None, modules_to_save=None))
        except ValueError:
            left_out = []
        if left_out:
            by = " and ".join(f"{f} {getattr(config, f)!r}" for f in ("exclude_modules", "modules_to_save")
                              if getattr(config, f))
            why = " (a module saved in full takes no adapter)" if config.modules_to_save else ""
            return f"target_modules {config.target_modules!r} matched only modules that {by} leave out{why}: {left_out[:8]}"
    names = [n for n, _ in model.named_modules() if n]
    wrappers = {n for n, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSave))}
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if n and (isinstance(m, LoraLayer) or lora_class_for(m) is not None) and not _inside_lora(n, wrappers)})
    patterns = [config.target_modules] if isinstance(config.target_modules, str) else config.target_modules
    close: list[str] = []
    for pattern in patterns:
        close += difflib.get_close_matches(pattern, leaves + names, n=5, cutoff=0.3)
    hint = f" Closest module names: {sorted(set(close))[:8]}." if close else ""
    where = ""
    if config.layers_to_transform is not None:
        where = f" (with layers_to_transform={config.layers_to_transform}, layers_pattern={config.layers_pattern})"
    return (f"target_modules {config.target_modules!r} matched no module of {type(model).__name__}{where}.{hint} "
            f"Targetable leaf names: {leaves[:20]}")


# ---- wrapping ---------------------------------------------------------------------------------------

def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def target_modules_for_file(model: nn.Module, config: LoraConfig) -> list[str] | str | None:
    """``config.target_modules`` as an adapter file should say it, so that PEFT wraps the same modules.

    ``"all-linear"`` stays ``"all-linear"`` where PEFT reads it the same way. PEFT 0.21 expands it to
    the Linear modules' full names and then matches those as suffixes, so where a non-Linear module's
    name ends with a Linear's (a top-level ``fc`` and an embedding ``block.fc``) it wraps that module
    too: the file then names lorakit's targets exactly, as a regex of their full names (PEFT and
    lorakit full-match a string), and means the same in both.
    """
    targets = config.target_modules
    if not (isinstance(targets, str) and targets.lower() == ALL_LINEAR):
        return targets
    check_model(model)
    named = list(model.named_modules())
    ours = _find_targets(model, config, named)
    linear = _find_targets(model, replace(config, exclude_modules=None, modules_to_save=None), named)
    peft_reading = _find_targets(model, replace(config, target_modules=sorted(linear)), named)
    if set(peft_reading) == set(ours):
        return targets
    return "(?:" + "|".join(re.escape(n) for n in sorted(ours)) + ")"


def _saved_matches(entries: list[str] | str, name: str) -> bool:
    """PEFT's ``modules_to_save`` rule: an entry names every module whose full name ends with it (a
    plain suffix, so ``"classifier"`` also names ``pre_classifier``); a string is a regex full-matched."""
    if isinstance(entries, str):
        return re.fullmatch(entries, name) is not None
    return any(name.endswith(e) for e in entries)


def _find_saved_module_names(model: nn.Module, config: LoraConfig, targets: list[str], strict: bool = True) -> list[str]:
    """Modules ``config.modules_to_save`` names (not LoRA targets, nor inside another saved module).

    ``strict``: an entry naming no module is an error (a typo would otherwise train nothing), except
    the heads the task type adds (PEFT adds both ``classifier`` and ``score`` for classification,
    whatever the model has); loading (``strict=False``) skips such entries, as PEFT does."""
    entries = config.modules_to_save
    if not entries:
        return []
    inside = {p for p, q in model.named_modules() if isinstance(q, ModulesToSave)}  # (and the names found)
    names: list[str] = []
    for n, m in model.named_modules():
        if (n and n not in targets and _saved_matches(entries, n) and not isinstance(m, LoraLayer)
                and not _inside_lora(n, inside)):
            names.append(n)
            inside.add(n)
    if strict and isinstance(entries, list):
        # (PEFT matches the entries against every module name, its LoRA layers' own parts included:
        # "out" names <target>.lora_dropout, a ModuleDict it then fails to wrap)
        parts = ("", ".base_layer", ".lora_A", ".lora_B", ".lora_dropout", ".lora_embedding_A", ".lora_embedding_B",
                 ".lora_magnitude_vector")
        clash = next(((e, t) for t in targets for part in parts for n in (t + part, t + part + ".default")
                      for e in entries if n.endswith(e) and (part or n == t)), None)
        if clash is not None:
            # PEFT wraps every module whose name ends with the entry, the LoRA target too: it refuses
            # such a config ("modules_to_save cannot be applied to modules of type lora.Linear") and
            # cannot load the adapter saved from it. lorakit keeps the target a LoRA target (DistilBERT's
            # pre_classifier under "all-linear" with task_type="SEQ_CLS" is a common case), and says so.

            warnings.warn(f"modules_to_save entry {clash[0]!r} also names the LoRA target {clash[1]!r} or a part of "
                          "its LoRA layer (PEFT matches it as a plain suffix of every module name): lorakit trains "
                          f"{clash[1]!r} with LoRA, but PEFT 0.21 refuses such a config and cannot load the adapter "
                          f"saved from it; for a PEFT-compatible adapter, leave {clash[1]!r} out of target_modules "
                          "(exclude_modules) or give a longer entry", stacklevel=4)
        optional = set(task_heads(config))
        missing = [e for e in entries if e not in optional and not any(n.endswith(e) for n in names)]
        if missing:
            raise ValueError(f"modules_to_save {missing} matched no module of {type(model).__name__}")
    elif strict and not names:
        raise ValueError(f"modules_to_save {entries!r} matched no module of {type(model).__name__}")
    return names


def _warn_rank_above_layer(model: nn.Module, targets: list[str], config: LoraConfig) -> None:
    """Warn when a rank exceeds min(in, out) of its layer: ΔW there cannot have that rank, and r·(in + out)
    adapter numbers outnumber the weight's own (a typo such as r=100000 would exhaust memory)."""
    over = []
    for name in targets:
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        weight = getattr(base, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
            # (out, in) Linear, (in, out) Conv1D, (num, dim) Embedding, (out, in/G, k, k) Conv2d. A
            # grouped one's update reads all in channels, each output group through its own r/G rank
            # channels (layers/conv2d.py): every (out, in·k·k) ΔW is reached once r/G >= min(out/G, in·k·k)
            groups = base.groups if isinstance(base, nn.Conv2d) else 1
            limit = min(weight.shape[0], weight[0].numel() * groups * groups)
            if config.rank_for(name) > limit:
                over.append((name, config.rank_for(name), limit))
    if over:
        name, r, limit = over[0]
        warnings.warn(f"rank {r} is above min(in, out) of {len(over)} targeted layer(s), e.g. {name!r} (at most rank "
                      f"{limit}): the update there cannot reach that rank, and its r x (in + out) adapter numbers "
                      "outnumber the layer's own weights", stacklevel=3)


# An adapter's name is a key of the layers' ParameterDict / ModuleDict stores, which refuse (after
# registering half of it) a key that is one of their attributes: "keys", "training", "to", ...
_RESERVED_NAMES = frozenset(dir(nn.ParameterDict())) | frozenset(dir(nn.ModuleDict()))


def check_adapter_name(name: Any) -> str:
    """``name`` if it can name an adapter, else a ValueError saying why.

    A name is a non-empty string without dots, not ``"__base__"`` (which means "no adapter" in
    mixed batches) and not an attribute of the layers' parameter stores (``"keys"``, ``"training"``,
    ``"to"``, ...: such a name left the model half-changed before this check).
    """
    if not isinstance(name, str) or not name or "." in name or name == "__base__":
        raise ValueError(f"adapter name must be a non-empty string without dots (and not '__base__', which "
                         f"means 'no adapter' in mixed batches), got {name!r}")
    if name in _RESERVED_NAMES:
        raise ValueError(f"adapter name {name!r} is an attribute of the layers' parameter stores "
                         "(nn.ParameterDict / nn.ModuleDict), which cannot hold it as a key; pick another name")
    return name


def inject_adapter(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                   init_lora_weights: bool | str | None = None, loading: bool = False) -> list[str]:
    """Add adapter ``adapter_name`` to every module ``config`` targets; returns the module names.

    The model is only changed once every target has been checked, so a bad config leaves it as it was.
    The caller's config object is never edited (a private copy is kept). ``init_lora_weights``
    overrides the config's initialisation (loading uses ``False``: the weights come from the file,
    and an init method such as PiSSA must not touch the base weights; ``loading=True`` also skips
    ``modules_to_save`` entries that name no module, as PEFT does, instead of refusing them).
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"expected a lorakit LoraConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    state = get_state(model)
    if state is not None and adapter_name in state.configs:
        raise ValueError(f"adapter {adapter_name!r} already exists on this model; pick another name or delete it first")
    if state is not None and config.bias != "none":
        # The biases are the base model's own, one set shared by every adapter: a second adapter
        # training them would overwrite the first one's (PEFT refuses this too).
        other = next((n for n, c in state.configs.items() if c.bias != "none"), None)
        if other is not None:
            raise ValueError(f"adapter {adapter_name!r} trains biases (bias={config.bias!r}), and adapter {other!r} "
                             f"on this model already does (bias={state.configs[other].bias!r}): biases are the base "
                             "model's own, shared by all adapters, so only one adapter on a model may train them; "
                             "use bias='none' for the others")
    config = with_task_heads(config)  # a private copy
    targets = find_target_modules(model, config)
    saved = _find_saved_module_names(model, config, targets, strict=not loading)
    if not loading:
        _check_patterns_match(config, targets)
        _warn_unmatched_entries(config, targets)
    variant = variant_for(config)  # validates the variant before any change
    init = config.init_lora_weights if init_lora_weights is None else init_lora_weights
    from lorakit.variants.pissa import is_convertible, prepare_residual_init

    untied: list[str] = []
    if is_convertible(init):  # PiSSA / OLoRA write into the base weights: every target checked first
        untied = prepare_residual_init(model, targets, config, init)
    _warn_rank_above_layer(model, targets, config)
    state = get_state(model, create=True)
    from lorakit.hf_methods import install  # (save_pretrained and the PEFT-integration methods: lorakit's)

    install(model)
    state.configs[adapter_name] = config
    if untied:
        state.untied[adapter_name] = untied
    try:
        for name in targets:
            module = model.get_submodule(name)
            if not isinstance(module, LoraLayer):
                layer = lora_class_for(module)(module).train(module.training)  # the wrapped module's mode
                _keep_off_fast_paths(model, name, layer)
                _set_submodule(model, name, layer)
                module = layer
            module.add_adapter(
                adapter_name,
                r=config.rank_for(name),
                lora_alpha=config.alpha_for(name),
                scaling=config.scaling_for(name),
                lora_dropout=config.lora_dropout,
                init_lora_weights=init,
                variant=type(variant)() if variant is not None else None,
            )
            # The model's active set, as in PEFT: the first adapter is active, a later one is not
            # until set_adapter names it.
            module.active_adapters = [adapter_name] if not state.active else list(state.active)
        for name in saved:
            module = model.get_submodule(name)
            if not isinstance(module, ModulesToSave):
                wrapper = ModulesToSave(module).train(module.training)
                _keep_off_fast_paths(model, name, wrapper)
                _set_submodule(model, name, wrapper)
                module = wrapper
            module.add_adapter(adapter_name)
            if state.active and adapter_name not in state.active:
                module.active_adapter = state.active[0]
    except BaseException:  # (a Ctrl-C too: PiSSA / OLoRA spend seconds per layer in this loop)
        _remove_adapter_everywhere(model, adapter_name)
        raise  # (the first adapter failing leaves no lorakit state behind either: forget_model)
    if not state.active:
        state.active = [adapter_name]
    from lorakit.multi import attach_mixed_batch  # here, not at the top: multi imports this module

    attach_mixed_batch(model)  # lets model(..., adapter_names=[...]) run a mixed-adapter batch
    return targets


def _python_path_only(module: nn.Module, args: Any) -> None:
    """A forward pre-hook that does nothing: its presence is the signal (see ``_keep_off_fast_paths``)."""
    return None


def _keep_off_fast_paths(model: nn.Module, name: str, wrapper: nn.Module) -> None:
    """Keep a wrapper inside an ``nn.TransformerEncoderLayer`` on that layer's Python path.

    In eval mode the encoder layer's native fast path reads ``linear1.weight`` / ``linear2.weight``
    (and the other weights) directly and never calls the modules, so an unmerged LoRA there would
    be silently ignored at evaluation and inference (PEFT 0.21.2 is). PyTorch skips that path when
    any submodule has a forward hook; this one, on the wrapper, is dropped with it on unload.
    """
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.TransformerEncoderLayer):
        wrapper.register_forward_pre_hook(_python_path_only)
        # nn.TransformerEncoder turns a padded batch into nested tensors before its layers when its
        # own checks pass (eval mode, frozen weights), and the Python path of the layer's attention
        # refuses them under autograd: the encoders above keep padded tensors while lorakit wraps
        # something inside (restored by ``restore_fast_paths``)
        parts = parent_name.split(".") if parent_name else []
        for i in range(len(parts) + 1):
            above = model.get_submodule(".".join(parts[:i])) if i else model
            if isinstance(above, nn.TransformerEncoder) and getattr(above, "use_nested_tensor", False):
                above.__dict__[_NESTED_KEY] = above.use_nested_tensor
                above.use_nested_tensor = False


_NESTED_KEY = "_lorakit_use_nested_tensor"


def restore_fast_paths(model: nn.Module) -> None:
    """Give each ``nn.TransformerEncoder`` with no lorakit wrapper left inside its ``use_nested_tensor``
    back (``_keep_off_fast_paths``)."""
    for _, module in model.named_modules():
        if _NESTED_KEY in module.__dict__ and not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in module.modules()):
            module.use_nested_tensor = module.__dict__.pop(_NESTED_KEY)


def tied_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters registered under more than one name (tied weights, e.g. an input
    embedding that is also the output head)."""
    seen: set[int] = set()
    tied: set[int] = set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (tied if id(p) in seen else seen).add(id(p))
    return tied


def untie_weight(model: nn.Module, module: nn.Module) -> bool:
    """Give ``module`` its own copy of its (tied) weight, so that changing it in place leaves the other
    module that shared it as it was; where that weight is the input or output embedding's, say so in
    the model's config (``tie_word_embeddings``, which transformers would otherwise tie again on
    loading). Returns whether the config flag was turned off."""
    weight = module.weight
    embeddings = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        try:
            embeddings.append(getattr(get(), "weight", None) if callable(get) else None)
        except (NotImplementedError, AttributeError):  # (transformers raises for models without one)
            pass
    module.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False) and any(w is weight for w in embeddings):
        config.tie_word_embeddings = False
        return True
    return False


def shared_modules(model: nn.Module) -> set[int]:
    """ids of the modules registered under more than one name."""
    seen: set[int] = set()
    shared: set[int] = set()
    for _, module in model.named_modules(remove_duplicate=False):
        (shared if id(module) in seen else seen).add(id(module))
    return shared


def module_of_its_own(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` with a parameter registry of its own (the same parameters, in a
    new dict), so that replacing its weight leaves ``module`` as it is; buffers, submodules and hooks
    stay shared (a hook added to or removed from ``module`` applies to the copy too)."""
    own = copy.copy(module)
    own.__dict__["_parameters"] = dict(module._parameters)
    return own


def untie_for_writing(model: nn.Module, path: str, shared: set[int] | None = None) -> tuple[nn.Module, nn.Module, bool]:
    """Before writing into the tied base weight of the module at ``path`` (a LoRA layer's base, or the
    module itself): give it a weight of its own, and a module of its own first where the module
    object is registered under another name too (replacing the shared object's weight would change
    that name as well). Returns ``(the module before, the module holding the copy, whether the
    config's tie_word_embeddings was turned off)``."""
    module = model.get_submodule(path)
    before = module.base_layer if isinstance(module, LoraLayer) else module
    base = before
    if id(base) in (shared_modules(model) if shared is None else shared):
        base = module_of_its_own(base)
        if isinstance(module, LoraLayer):
            module.base_layer = base
        else:
            _set_submodule(model, path, base)
    return before, base, untie_weight(model, base)


def untie_tied_for_merge(model: nn.Module, layers: list[tuple[str, LoraLayer]]) -> None:
    """Give each of ``layers`` (about to merge) whose base weight is tied to another module, or is an
    original weight an earlier merge untied (``LoraState.ties``), a copy of its own first
    (``untie_for_writing``), and record it, so that no merge ever writes into an original and
    ``retie`` can restore the tie exactly."""
    state = require_state(model)
    tied = tied_parameters(model)
    shared = shared_modules(model)
    for path, layer in layers:
        weight = layer.base_layer.weight
        group = next((g for g in state.ties if g["weight"] is weight), None)
        if id(weight) not in tied and group is None:
            continue
        warnings.warn(f"{path}: its base weight is tied to another module; merging unties it (the other module "
                      "keeps the original weight; unmerge(model) or unload ties it again once nothing is merged)",
                      stacklevel=4)
        if group is None:
            group = {"weight": weight, "print": cast_print(weight), "config": False, "holders": []}
            state.ties.append(group)
        before, base, flipped = untie_for_writing(model, path, shared)
        if layer.merged_adapters:
            # a layer-level merge wrote into the shared weight already (as documented for
            # LoraLayer.merge): the original holds that update, so no tie to restore is recorded
            if not group["holders"]:
                state.ties.remove(group)
            continue
        group["config"] = group["config"] or flipped
        entry = {"path": path, "before": before, "base": base, "written": cast_print(base.weight)}
        group["holders"].append(entry)
        layer.__dict__["untied_from"] = entry  # (``LoraLayer._note_write`` keeps entry["written"] current)


def retie(model: nn.Module) -> None:
    """Restore the ties merging undid (``LoraState.ties``) where none of a tie's holders has anything
    merged: each holder gets the original weight back (its copy holds W + ΔW − ΔW, equal to rounding),
    or its shared module where it got a module of its own, and the config its tie_word_embeddings.
    A tie whose original or copies were changed since (other than by lorakit, or a cast of the whole
    model), or whose modules were replaced, is dropped: those modules keep their copies."""
    state = get_state(model)
    if state is None or not state.ties:
        return
    for group in list(state.ties):
        found, keep, drop = [], True, False
        for entry in group["holders"]:
            try:
                module = model.get_submodule(entry["path"])
            except AttributeError:
                drop = True
                break
            layer = module if isinstance(module, LoraLayer) else None
            base = layer.base_layer if layer is not None else module
            if base is not entry["base"] or not same_up_to_cast(entry["written"], base.weight):
                drop = True
                break
            if layer is not None and layer.merged_adapters:
                keep = False  # still merged: later
            found.append((entry, layer, base))
        weight = group["weight"]
        if not drop and not keep:
            continue
        state.ties.remove(group)
        for entry, layer, _ in found:
            if layer is not None:
                layer.__dict__.pop("untied_from", None)
        if drop or not same_up_to_cast(group["print"], weight):
            continue
        current = found[0][2].weight if found else weight
        if weight.dtype != current.dtype or weight.device != current.device:
            if any(p is weight for p in model.parameters()):
                continue  # (held by a module that was not cast with the rest: leave it alone)
            with torch.no_grad():
                weight.data = weight.data.to(device=current.device, dtype=current.dtype)
        for entry, layer, base in found:
            if entry["before"] is not base:  # the shared module again (it kept the original weight)
                if layer is not None:
                    layer.base_layer = entry["before"]
                else:
                    _set_submodule(model, entry["path"], entry["before"])
            else:
                base.weight = weight
        config = getattr(model, "config", None)
        if group["config"] and config is not None:
            config.tie_word_embeddings = True


def _remove_adapter_everywhere(model: nn.Module, adapter_name: str) -> None:
    """Delete ``adapter_name`` from every layer and unwrap layers left without adapters."""
    for name, layer in list(iter_lora_layers(model)):
        if adapter_name in layer.lora_A:
            layer.delete_adapter(adapter_name)
        if not layer.lora_A:
            _set_submodule(model, name, layer.base_layer)
    for name, wrapper in list(iter_saved_modules(model)):
        if adapter_name in wrapper.modules_to_save:
            del wrapper.modules_to_save[adapter_name]
            if wrapper.active_adapter == adapter_name:
                wrapper.active_adapter = next(iter(wrapper.modules_to_save), None)
        if not len(wrapper.modules_to_save):
            _set_submodule(model, name, wrapper.original_module)
    restore_fast_paths(model)
    retie(model)  # (a merge's untie, on layers the removal unmerged or unwrapped)
    state = get_state(model)
    if state is not None:
        state.configs.pop(adapter_name, None)
        state.untied.pop(adapter_name, None)
        state.trainable.discard(adapter_name)
        if adapter_name in state.active:
            state.active.remove(adapter_name)
        if not state.configs:  # the last one (deleted, or a first injection / load that failed)
            forget_model(model)


def forget_model(model: nn.Module) -> None:
    """Drop what lorakit keeps on ``model`` itself: its state, the mixed-batch hooks and the
    methods ``lorakit.hf_methods`` gave it (the model is then as lorakit found it)."""
    model.__dict__.pop("_lorakit", None)
    from lorakit.hf_methods import remove
    from lorakit.multi import detach_mixed_batch  # (multi imports this module)

    remove(model)
    detach_mixed_batch(model)


def mark_trainable(model: nn.Module, freeze_all: bool = False, only: str | None = None) -> None:
    """Set ``requires_grad`` on what lorakit manages: the adapters' weights, the copies of
    ``modules_to_save`` and, where a config trains biases, those biases — on for the trainable
    adapters, off for the rest. ``freeze_all`` (the first adapter on a model) first freezes every
    parameter of the model; later calls leave parameters lorakit does not manage as the user set
    them (as PEFT does when an adapter is added). ``only`` (an adapter just added to a model that
    had others): set that adapter's own tensors alone (and the biases its config trains), leaving
    the other adapters' as they are — before, adding one switched a tensor the user had frozen in
    another (LoRA-FA's frozen A) back on."""
    state = require_state(model)
    if only is not None and not freeze_all:
        _mark_one(model, state, only)
        return
    if freeze_all:
        for p in model.parameters():
            p.requires_grad_(False)
    for _, layer in iter_lora_layers(model):
        for store in layer.children():
            if isinstance(store, nn.ParameterDict):
                for p in store.values():
                    p.requires_grad_(False)
    for _, wrapper in iter_saved_modules(model):
        wrapper.modules_to_save.requires_grad_(False)
    biases = {c.bias for c in state.configs.values()}
    if "all" in biases:
        for _, p in model_biases(model):
            p.requires_grad_(False)
    elif "lora_only" in biases:
        for _, layer in iter_lora_layers(model):
            if getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(False)
    for name in state.trainable:
        _mark_one(model, state, name)


def _mark_one(model: nn.Module, state: Any, name: str) -> None:
    """Adapter ``name``'s tensors (its ParameterDict entries, its ``modules_to_save`` copies) on if
    it trains, else off; the biases its config trains on if it trains (never turned off here)."""
    on = name in state.trainable
    config = state.configs[name]
    for _, layer in iter_lora_layers(model):
        for store in layer.children():
            if isinstance(store, nn.ParameterDict) and name in store:
                store[name].requires_grad_(on)
        if on and config.bias == "lora_only" and name in layer.lora_A and getattr(layer.base_layer, "bias", None) is not None:
            layer.base_layer.bias.requires_grad_(True)
    for _, wrapper in iter_saved_modules(model):
        if name in wrapper.modules_to_save:
            wrapper.modules_to_save[name].requires_grad_(on)
    if on and config.bias == "all":
        for _, p in model_biases(model):
            p.requires_grad_(True)


def _lorakit_config(config: Any) -> LoraConfig:
    """``config``, or PEFT's ``LoraConfig`` as lorakit's (what lorakit does not implement refused by
    name, as when its adapter_config.json is loaded)."""
    if isinstance(config, LoraConfig) or not (callable(getattr(config, "to_dict", None)) and hasattr(config, "peft_type")):
        return config  # (anything else: inject_adapter's TypeError)
    source = f"PEFT's {type(config).__name__}"
    if getattr(config, "ensure_weight_tying", False):  # (ignored in a file, where it only explains a refusal)
        raise ValueError(f"{source}: ensure_weight_tying=True ties the output head's adapter to the input "
                         "embedding's, which lorakit does not implement")
    return LoraConfig.from_dict(config.to_dict(), source=source)


def get_lora_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Inject a trainable LoRA adapter into ``model`` in place; the first adapter freezes everything else.

    A later adapter leaves the other adapters as they are (``set_trainable`` chooses which train) and
    does not re-freeze parameters you unfroze yourself.

    Args:
        model: Any ``nn.Module`` (a transformers model, a torchvision net, your own).
        config: Which modules to adapt and how: a ``lorakit.LoraConfig``, or PEFT's ``LoraConfig``
            (read as its ``adapter_config.json`` would be: ``LoraConfig.from_dict(config.to_dict())``).
        adapter_name: Name of the adapter (several can live on one model).

    Returns:
        The same ``model`` object, with LoRA layers in place of its targeted modules.

    Raises:
        ValueError: the targets match nothing or an unsupported module type, or the name is taken.
    """
    config = _lorakit_config(config)
    state = get_state(model)
    first = state is None or not state.configs  # (after its last adapter was deleted, a model starts afresh)
    inject_adapter(model, config, adapter_name)
    state = require_state(model)
    if not config.inference_mode:  # (inference_mode=True: the adapter starts frozen, as in PEFT)
        state.trainable.add(adapter_name)
    else:
        import warnings

        # (PEFT writes inference_mode: true into every adapter_config.json it saves, so a config read
        # from one makes a frozen adapter: said, not silent)
        warnings.warn(f"adapter {adapter_name!r} is created frozen: its config has inference_mode=True (as PEFT "
                      "writes into every saved adapter_config.json); set inference_mode=False to train it, or "
                      f"lorakit.set_trainable(model, [{adapter_name!r}])", stacklevel=2)
    mark_trainable(model, freeze_all=first, only=adapter_name)
    return model
