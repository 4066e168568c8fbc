"""LoraLayer: a frozen base layer plus any number of named low-rank adapters.

    h = base(x) + Σ_active  scaling_n · B_n(A_n(dropout(x)))

Subclasses supply only geometry (``lorakit/layers/conv2d.py`` and ``gpt2_conv1d.py`` are the smallest;
``linear.py`` adds a lean inference path and batched mixed-adapter batches on top):
the shapes of A and B, how the branch B(A(x)) is computed for that layer type, and how
ΔW = B @ A is laid out in the base weight's layout for merging. Everything else — adapters kept in
``ParameterDict``s so ``.to()`` reaches them, dropout, scaling, merge / unmerge, disabling, variants —
lives here once.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.modules import module as _module

from lorakit.layers.guard import bits_print, cast_print, same_up_to_cast, with_chains
from lorakit.layers.offload import materialized, put_back, readable, remember, stored_tensor
from lorakit.variants import LoraVariant, add_rounded_once, get_init_method


def computed_weight(module: nn.Module, keep: str = "unmerged") -> str | None:
    """Why ``module.weight`` cannot be written in place, or None: a merge (and a PiSSA residual)
    writes into the weight, which is lost where the weight is computed from other tensors at every
    access or forward (``torch.nn.utils.parametrize``: weight_norm, orthogonal, spectral_norm; the
    older hook-based ``weight_norm`` / ``spectral_norm``, pruning). The merge used to be recorded and
    silently lost (PEFT 0.21.2 loses it too), and so did an unmerge after the weight became
    computed (the adapter then counted twice). A quantised base (``dequantize_weight``) merges into
    a dense copy of its own and is not concerned. The reason ends with what to do instead: keep the
    adapter ``keep`` ("unmerged" when refusing a merge, "merged" an unmerge), or remove what
    computes the weight."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, "weight"):
        kind = type(module).__bases__[0].__name__  # (parametrize swaps in a subclass "Parametrized...")
        names = ", ".join(type(p).__name__ for p in module.parametrizations.weight)
        return (f"the {kind}'s weight is computed by a parametrization ({names}) at every access, so what is "
                f"written into it is lost; keep the adapter {keep}, or remove the parametrization first "
                "(torch.nn.utils.parametrize.remove_parametrizations)")
    if callable(getattr(module, "dequantize_weight", None)):
        return None
    if not isinstance(module._parameters.get("weight"), nn.Parameter) and not isinstance(
            module._buffers.get("weight"), torch.Tensor):  # (a buffer is a tensor of its own: writable)
        return (f"the {type(module).__name__}'s weight is not a parameter of its own but recomputed at every "
                "forward (a hook-based weight_norm / spectral_norm, or pruning?), so what is written into it is lost; "
                f"keep the adapter {keep}, or remove the hook first (torch.nn.utils.remove_weight_norm / "
                "remove_spectral_norm, torch.nn.utils.prune.remove)")
    return None


def float8_weight(module: nn.Module, keep: str) -> str | None:
    """Why a merge into ``module.weight`` (or an unmerge out of it) is refused, or None: a float8
    weight (a model cast with ``.to(torch.float8_e4m3fn)``), which torch's arithmetic does not take
    (a merge raised torch's "Promotion for Float8 Types is not supported"; an unmerge said the
    adapter had changed since the merge, though only the cast had)."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.element_size() == 1:
        return (f"the {type(module).__name__}'s weight is {str(weight.dtype).removeprefix('torch.')}, which lorakit "
                f"does not merge into or out of; keep the adapter {keep}, or cast the model to a 16- or 32-bit "
                "float type first")
    return None


def meta_weight(module: nn.Module, keep: str) -> str | None:
    """Why a merge into ``module.weight`` (or an unmerge out of it) is refused, or None: a weight on
    the meta device, which holds no data, and not offloaded by accelerate (whose hook keeps the
    weight in its offload map: ``lorakit.layers.offload``, where merges go). A write to the meta
    tensor did nothing, silently, and the adapter was counted as merged (its update lost)."""
    if readable(module):  # (the parameter itself, not a computed ``weight``: an NF4 layer's would dequantise)
        return None
    how = ("accelerate offloads this layer, but its hook does not hold the weight" if hasattr(module, "_hf_hook")
           else "the model is not materialised, or an enclosing module's accelerate hook holds the weight, as "
                "with cpu_offload's preload_module_classes")
    return (f"the {type(module).__name__}'s weight is on the meta device ({how}): there is no data to merge "
            f"into; keep the adapter {keep}, or load the model with its weights to merge")


def unwritable_weight(module: nn.Module, keep: str) -> str | None:
    """Why lorakit cannot add an update into ``module.weight`` or take it out again, or None:
    ``computed_weight``, ``float8_weight`` or ``meta_weight`` (what a merge and an unmerge both refuse)."""
    return computed_weight(module, keep) or float8_weight(module, keep) or meta_weight(module, keep)


def dropping(dropout: nn.Module | None) -> bool:
    """Whether a LoRA dropout module drops now: an ``nn.Dropout`` with ``p`` > 0 in training mode,
    its own mode, read first and straight from its ``__dict__`` (this runs per layer in decoding,
    where ``LoraLayer.dropout_p``'s ``Module.__getattr__`` per adapter cost ~3% of a step)."""
    return dropout is not None and dropout.__dict__["training"] and isinstance(dropout, nn.Dropout) and dropout.p > 0


def runs_own_forward(module: nn.Module, cls: type[nn.Module] | None) -> bool:
    """Whether calling ``module`` returns what ``cls.forward`` makes: it is exactly a ``cls`` (not a
    subclass), has no ``forward`` replaced on the instance, and no forward hook, of its own or
    global, could keep its output or return another tensor."""
    d = module.__dict__
    return (type(module) is cls and "forward" not in d and not d["_forward_hooks"]
            and not _module._global_forward_hooks)


class LoraLayer(nn.Module):
    """Base class of every LoRA layer type.

    Attributes:
        base_layer: The wrapped, frozen module. Its parameters keep their names
            (``<path>.base_layer.weight``), as in PEFT.
        lora_A / lora_B: ``ParameterDict`` adapter name -> A ``(r, in, ...)`` / B ``(out, r, ...)``.
        scaling: adapter name -> alpha / r (or alpha / sqrt(r) with rsLoRA).
        active_adapters: Names whose update is added in ``forward`` (their updates are summed).
        merged_adapters: Names currently folded into ``base_layer.weight``.
        disabled: When True, ``forward`` returns exactly the base layer's output.
    """

    #: Names of A and B in the PEFT on-disk format, after ``base_model.model.<module path>.``
    disk_names: ClassVar[tuple[str, str]] = ("lora_A.weight", "lora_B.weight")
    #: The module type this layer wraps (set by ``register_layer_type``).
    base_type: ClassVar[type[nn.Module] | None] = None
    #: True when the layer type supports dropout on its input (not for token ids).
    supports_dropout: ClassVar[bool] = True
    #: Shared per-model context of mixed-adapter batches (``lorakit.multi.MixedBatchContext``),
    #: set on every layer at injection; its ``plan`` says which rows use which adapter, or is None.
    batch_context: Any = None

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        # Variants that own extra tensors (DoRA's magnitude) register their own ParameterDicts.
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.variants: dict[str, LoraVariant] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.merge_stamps: dict[str, tuple] = {}  # adapter -> its tensors' fingerprint when merged
        self.merge_calls: dict[str, int] = {}  # adapter -> which merge folded it in (same number: one merge)
        self.disabled = False

    # ---- geometry, supplied by each layer type ----------------------------------------------------

    def a_shape(self, r: int) -> tuple[int, ...]:
        """Shape of A for rank ``r``."""
        raise NotImplementedError

    def b_shape(self, r: int) -> tuple[int, ...]:
        """Shape of B for rank ``r``."""
        raise NotImplementedError

    def branch(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """Unscaled B(A(x)) in the base output's layout; never builds B @ A."""
        raise NotImplementedError

    def delta_from(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """Unscaled ΔW = B @ A laid out like ``base_layer.weight``."""
        raise NotImplementedError

    @property
    def rank_groups(self) -> int:
        """How many groups B splits the r rank channels into, each feeding only its own share of the
        outputs: 1 (B reads all r), except on a grouped Conv2d (its ``groups``)."""
        return 1

    def why_not_mergeable(self) -> str | None:
        """Why no adapter of this layer can be folded into its weight, or None (it can): a weight
        computed from other tensors or a float8 one (``unwritable_weight``); layer types add their
        own reasons."""
        return unwritable_weight(self.base_layer, "unmerged")

    def init_ab(self, A: torch.Tensor, B: torch.Tensor, r: int) -> None:
        """Default init (``init_lora_weights=True``): A kaiming-uniform(a=√5), B = 0 (Hu et al. §4.1)."""
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)

    def init_gaussian(self, A: torch.Tensor, B: torch.Tensor, r: int) -> None:
        """``init_lora_weights="gaussian"``: A normal with std 1/r, B = 0 (PEFT's rule)."""
        nn.init.normal_(A, std=1.0 / r)
        nn.init.zeros_(B)

    # ---- adapters -------------------------------------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (so code that reads ``module.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias, or None (as ``module.bias`` reads on the module this layer wraps)."""
        return getattr(self.base_layer, "bias", None)

    def add_adapter(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        scaling: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        variant: LoraVariant | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Create adapter ``name`` with A ``a_shape(r)`` and B ``b_shape(r)``.

        Args:
            name: Adapter name; must not exist on this layer yet.
            r: Rank.
            lora_alpha: Alpha (kept for reporting; ``scaling`` is what forward uses).
            scaling: Multiplier of B(A(x)).
            lora_dropout: Dropout probability on the branch input.
            init_lora_weights: True, False, "gaussian", or an init method's name (e.g. "pissa").
            variant: Hooks of a LoRA variant (DoRA, ...), or None for plain LoRA.
            dtype: dtype of A and B; defaults to the base weight's dtype, upcast to float32 when the
                base is half precision (adapters train in fp32 on a bf16/fp16 base; on a bf16 base the
                training branch's products run in bf16, see ``lorakit.layers.fused.branch_dtype``).

        Raises:
            ValueError: the name is taken, or the layer cannot take rank ``r`` (a grouped Conv2d
                needs a multiple of its groups).
        """
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        weight = self.base_layer.weight
        if dtype is None:
            dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) or not weight.is_floating_point() else weight.dtype
        device = weight.device if weight.device.type != "meta" else None
        a_shape, b_shape = self.a_shape(r), self.b_shape(r)  # (a rank the layer cannot take: refused here)
        self.lora_A[name] = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=device))
        self.lora_B[name] = nn.Parameter(torch.empty(b_shape, dtype=dtype, device=device))
        self.set_dropout(name, lora_dropout)
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, float(lora_alpha), float(scaling)
        if variant is not None:
            self.variants[name] = variant
        self.reset_adapter(name, init_lora_weights)
        if variant is not None:
            variant.on_add(self, name)
        if name not in self.active_adapters:
            self.active_adapters.append(name)

    @torch.no_grad()
    def reset_adapter(self, name: str, init_lora_weights: bool | str = True) -> None:
        """(Re)initialise A and B of ``name`` as ``init_lora_weights`` asks."""
        A, B = self.lora_A[name], self.lora_B[name]
        if init_lora_weights is True:
            self.init_ab(A, B, self.r[name])
        elif init_lora_weights is False:
            # Both non-zero: the adapter changes the output from the start (used by tests).
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.normal_(B, std=0.02)
        elif isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian":
            self.init_gaussian(A, B, self.r[name])
        elif isinstance(init_lora_weights, str):
            self.__dict__.pop("offload_unmerged", None)  # (remembered before this write: stale after it)
            with materialized(self.base_layer, write=True):  # (PiSSA / OLoRA write a residual into the weight)
                get_init_method(init_lora_weights)(self, name, init_lora_weights)
        else:
            raise ValueError(f"init_lora_weights must be True, False, 'gaussian' or a method name, got {init_lora_weights!r}")

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` and release its tensors (unmerging it first if merged)."""
        if name not in self.lora_A:
            raise KeyError(f"adapter {name!r} not on this layer; it has {list(self.lora_A)}")
        if name in self.merged_adapters:
            self.unmerge([name])
        variant = self.variants.pop(name, None)
        if variant is not None:
            variant.on_delete(self, name)
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            del store[name]
        for attr in ("lora_init_A", "lora_init_B"):  # a PiSSA/OLoRA adapter's A0, B0 (variants/pissa.py);
            store = getattr(self, attr, None)         # its residual stays in the base weight, as in PEFT
            if store is not None and name in store:
                del store[name]
        for store in (self.r, self.lora_alpha, self.scaling):
            store.pop(name, None)
        if name in self.active_adapters:
            self.active_adapters.remove(name)
        self.__dict__.pop("_batched", None)  # stacked copies of the mixed-batch path (layers/linear.py)

    # ---- forward ---------------------------------------------------------------------------------

    def live_adapters(self) -> list[str]:
        """Active adapters whose update ``forward`` adds: present on this layer and not merged."""
        present = self.lora_A._parameters  # plain dict: ParameterDict's own lookups cost ~1 µs each
        merged = self.merged_adapters
        return [n for n in self.active_adapters if n in present and n not in merged]

    def lora_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """scaling · B(A(dropout(x))) for adapter ``name``, in the adapter's dtype."""
        A, B = self.lora_A[name], self.lora_B[name]
        return self.branch(self.lora_dropout[name](x), A, B) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """h = base(x) + Σ_{active n} s_n · B_n(A_n(dropout(x))), over the active, unmerged adapters.

        Disabled: the base output alone. Inside a mixed-adapter batch (``adapter_batch``), each row
        gets its own adapter (``mixed_forward``). A variant (DoRA) computes its adapter's term
        itself. fp32 adapters on a half-precision base: their updates are summed in fp32 and the sum
        rounded once to the output's dtype (``sum_dtype``). Subclasses may take faster paths that
        compute the same (``LoraLinear.forward``).
        """
        result = self.base_output(x, *args, **kwargs)
        if self.disabled:
            return result
        result = self.own_output(result)
        plan = self.batch_context.plan if self.batch_context is not None else None
        if plan is not None:
            return self.mixed_forward(x, result, plan)
        live = self.live_adapters()
        self.refuse_meta_adapters(live)
        narrow = None
        wide = self.sum_dtype(result, live)
        if wide is not None:
            narrow, result = result.dtype, result.to(wide)
        for name in live:
            variant = self.variants.get(name) if self.variants else None
            if variant is not None:
                result = variant.forward(self, name, x, result)
            else:
                result = self.add_lora(name, x, result)
        return result if narrow is None else result.to(narrow)

    def base_output(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The base layer's output for ``x``: its call (layer types may compute the same faster)."""
        return self.base_layer(x, *args, **kwargs)

    def refuse_meta_adapters(self, names: list[str]) -> None:
        """Raise where an adapter to be applied has its weights on the meta device (accelerate's
        ``cpu_offload`` / ``disk_offload`` applied after injection moves them there, and lorakit reads
        them without calling the modules its hooks sit on): a product of a meta tensor with CPU ones
        returns uninitialised memory, without an error (the outputs were NaN or garbage)."""
        As, Bs = self.lora_A._parameters, self.lora_B._parameters
        meta = [n for n in names if n in As and (As[n].is_meta or Bs[n].is_meta)]
        if meta:
            raise RuntimeError(
                f"{type(self).__name__}: the weights of adapter(s) {meta} are on the meta device (no data: an "
                "accelerate cpu_offload / disk_offload applied after the adapters were added moves them there); "
                "add the adapters after offloading, or load their weights again (load_adapter_weights)")

    def sum_dtype(self, result: torch.Tensor, live: list[str]) -> torch.dtype | None:
        """With several adapters on a half-precision output, the dtype to sum their updates in (the
        adapters' wider one, fp32 on a bf16 base, rounded to the output's dtype once at the end,
        as PEFT does), else None: one adapter's update is rounded once into the output anyway."""
        if len(live) < 2 or not result.is_floating_point():
            return None
        As = self.lora_A._parameters
        wide = result.dtype
        for name in live:
            wide = torch.promote_types(wide, As[name].dtype)
        return wide if wide != result.dtype else None

    def own_output(self, result: torch.Tensor) -> torch.Tensor:
        """The base layer's output as a tensor the adapters may be added into in place: ``result``
        itself when the base layer is exactly the type this layer wraps (whose forward makes a new
        tensor), with no ``forward`` replaced on the instance and no forward hook (its own or global)
        that could keep the output or return another tensor (say, its input); else a copy, so that a
        tensor someone else holds — an activation a hook captured, the input, an output autograd
        saved — is never written to."""
        if runs_own_forward(self.base_layer, self.base_type):
            return result
        return result.clone() if isinstance(result, torch.Tensor) else result

    def add_lora(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result + scaling · B(A(dropout(x)))`` for adapter ``name`` (layer types may fuse this)."""
        return add_rounded_once(result, self.lora_delta(name, x))

    def mixed_forward(self, x: torch.Tensor, result: torch.Tensor, plan: Any) -> torch.Tensor:
        """Mixed-adapter batch: each row group gets only its own adapter (``__base__`` rows: none).

        Rows were grouped once per model forward (``lorakit.multi.MixedBatchPlan``): a contiguous
        group is a slice (views, no copies), any other an index (index_select + index_add_).

        Args:
            x: Layer input, batch first ``(batch, ...)``.
            result: ``base_layer(x)``, updated in place.
            plan: ``batch_size`` and ``groups``: ``(adapter name, slice | LongTensor of rows)``.

        Raises:
            ValueError: an adapter of this layer is merged, or the input's batch size is not the plan's.
        """
        if self.merged_adapters:
            raise ValueError(f"mixed-adapter batch on a layer with merged adapters {self.merged_adapters}; unmerge first")
        if x.shape[0] != plan.batch_size:
            raise ValueError(f"mixed-adapter batch of {plan.batch_size} rows, but this layer's input has shape "
                             f"{tuple(x.shape)} (LoRA layers must see the batch on dim 0)")
        # Per group and layer this runs once per adapter in the batch, so it avoids Python overhead:
        # direct dict reads (ParameterDict's __getitem__ costs ~1 µs) and no dropout call in eval.
        As, Bs, drops = self.lora_A._parameters, self.lora_B._parameters, self.lora_dropout._modules
        # Nothing to differentiate and no dropout: a contiguous group's delta goes straight into its
        # rows of the output (no group-sized temporary), by the code a forward with that adapter
        # alone runs (fused_lora_add's inference path).
        in_place = result.is_contiguous() and not torch.is_autocast_enabled(x.device.type)
        grad_on = torch.is_grad_enabled()
        input_grad = grad_on and (x.requires_grad or result.requires_grad)
        if grad_on and result._base is not None:
            # F.linear of a 3-D input with a bias returns a view of its 2-D result: autograd refuses
            # an index_add_ into it after an add_ into a slice of it (as the generic path, add into a copy)
            result = result.clone()
        for name, rows in plan.groups:
            A = As.get(name)
            if A is None:
                continue  # "__base__", or an adapter that does not target this layer
            if not isinstance(rows, slice) and rows.device != x.device:
                rows = rows.to(x.device)
            sub_x = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
            variant = self.variants.get(name) if self.variants else None
            if variant is not None:  # the variant rewrites its rows' output (e.g. DoRA's rescaling)
                sub = result[rows].clone() if isinstance(rows, slice) else result.index_select(0, rows)
                out = variant.forward(self, name, sub_x, sub).to(result.dtype)
                if isinstance(rows, slice):
                    result[rows] = out
                else:
                    result.index_copy_(0, rows, out)
                continue
            if (in_place and isinstance(rows, slice) and not input_grad
                    and not (grad_on and (A.requires_grad or Bs[name].requires_grad))
                    and not self.dropout_p(name)
                    and self.add_rows(result[rows], sub_x, A, Bs[name], self.scaling[name])):
                continue
            sub_x = drops[name](sub_x)  # (in the dropout module's own mode: see dropout_p)
            delta = self.branch(sub_x, A, Bs[name])  # (an fp32 delta is added to a bf16 output rounded once)
            if isinstance(rows, slice):
                result[rows].add_(delta, alpha=self.scaling[name])
            elif delta.dtype == result.dtype:
                result.index_add_(0, rows, delta, alpha=self.scaling[name])
            else:
                result.index_copy_(0, rows, result.index_select(0, rows).add_(delta, alpha=self.scaling[name]))
        return result

    def set_dropout(self, name: str, p: float) -> None:
        """Adapter ``name``'s LoRA dropout probability (on its input; none for token-id layers)."""
        p = float(p)
        # in the layer's mode: an adapter added to a model in eval mode must not drop anything
        self.lora_dropout[name] = (nn.Dropout(p) if p > 0 and self.supports_dropout else nn.Identity()).train(self.training)

    def dropout_p(self, name: str) -> float:
        """Drop probability adapter ``name``'s LoRA dropout applies now: its ``nn.Dropout``'s ``p``
        while that module is in training mode, else 0 (no dropout, or the module in eval mode).

        The dropout module's own mode decides, as when it is called: ``model.train()`` then
        ``.eval()`` on the dropout modules switches LoRA dropout off, and a model in eval mode with
        them in training mode (Monte Carlo dropout) drops (before, the layer's mode decided)."""
        dropout = self.lora_dropout._modules[name]
        return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0

    def drops_now(self) -> bool:
        """Whether any adapter's LoRA dropout drops now (``dropout_p`` > 0; see ``dropping``)."""
        for dropout in self.lora_dropout._modules.values():
            if dropping(dropout):
                return True
        return False

    def add_rows(self, out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> bool:
        """Inference hook of ``mixed_forward``: add ``scale · B(A(x))`` into ``out`` (a contiguous row
        block of the layer's output) in place and return True, or return False to take the generic
        path. Layer types that can do it without temporaries override this."""
        return False

    # ---- merge -----------------------------------------------------------------------------------

    def delta_weight(self, name: str, for_norm: bool = False) -> torch.Tensor:
        """scaling · ΔW of adapter ``name`` in the base weight's layout (computed in float32 or better);
        ``for_norm``: as DoRA's forward forms it for its column norm (``norm_delta_from``)."""
        A, B = self.lora_A[name], self.lora_B[name]
        dtype = torch.promote_types(A.dtype, torch.float32)
        product = self.norm_delta_from if for_norm else self.delta_from
        return product(A.to(dtype), B.to(dtype)).mul_(self.scaling[name])  # (a fresh product: scaled in place)

    def norm_delta_from(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """ΔW as DoRA's forward forms it for its column norm: ``delta_from`` (a layer type where PEFT
        forms that product otherwise overrides it, to give PEFT's norm to the bit)."""
        return self.delta_from(A, B)

    def merged_weight(self, adapter_names: list[str] | None = None) -> tuple[list[str], torch.Tensor | None]:
        """What ``merge`` would write, without writing it: ``(adapters merged now, new weight)`` in
        float32 or wider (``None`` when nothing is left to merge).

        Each adapter is folded in, in order, as the unmerged forward applies it; a variant whose
        update depends on the base weight (DoRA's column norm) sees the weight as it is before this
        merge, as its forward does, not with the adapters before it already folded in.
        """
        pending = self.merge_order(adapter_names)
        if not pending:
            return [], None
        return pending, self._folded(pending)

    def _folded(self, pending: list[str]) -> torch.Tensor:
        """The weight with ``pending`` folded in, in that order, from the weight as it is now."""
        dequantize = getattr(self.base_layer, "dequantize_weight", None)
        start = dequantize() if callable(dequantize) else stored_tensor(self.base_layer)
        start = start.detach().to(torch.promote_types(start.dtype, torch.float32))
        work = start.clone()
        for name in pending:
            variant = self.variants.get(name)
            if variant is not None:
                work = variant.merged_weight(self, name, work, start)
            else:
                work += self.delta_weight(name)
        return work

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe: bool = False, *, stamp: bool = True) -> None:
        """Fold adapters into ``base_layer.weight``: W ← W + scaling · ΔW.

        This layer-level call writes into the weight as it is: a weight tied to another module (an
        output head tied to the input embedding) changes there too. ``lorakit.merge(model)`` unties
        such a weight first.

        Args:
            adapter_names: Adapters to merge; default the active ones.
            safe: Check the merged weight is finite before writing it.
            stamp: Keep a fingerprint of each merged adapter's tensors (``merge_stamp``), so that
                ``unmerge`` can refuse to subtract an adapter changed since. ``merge_and_unload``,
                which removes the layer and never unmerges, passes False: the fingerprints were
                about half its time (94 of 209 ms under cProfile on a 30-layer model, r 16 on all linear layers).

        Raises:
            ValueError: the weight cannot take the update (``why_not_mergeable``: computed from other
                tensors, or a grouped Conv2d), or ``safe`` is set and the merged weight has NaN/Inf
                (the layer is unchanged: the weight is written once, after every adapter is folded in).
        """
        pending = self.merge_order(adapter_names)
        blocked = self.why_not_mergeable() if pending else None
        if not self.merged_adapters:  # (an offloaded weight: what an unmerge of all puts back; see remember)
            self.remember_unmerged()
        try:
            if blocked:
                raise ValueError(f"cannot merge {pending}: {blocked}; the layer is unchanged")
            if pending:
                with materialized(self.base_layer, write=True):  # (an offloaded weight: merged into its offload map)
                    if not safe and len(pending) == 1 and self._adds_in_place(pending[0]):
                        self.base_layer.weight.add_(self.delta_weight(pending[0]))
                        self._note_merge(pending, stamp)
                        return
                    pending, new = self.merged_weight(adapter_names)
                    if safe and not torch.isfinite(new).all():
                        raise ValueError(f"merging adapter(s) {pending} gives non-finite weights; the layer is unchanged")
                    self._write_merge(pending, new, stamp)
        finally:
            if not self.merged_adapters:  # (nothing merged after all: what was remembered would go stale)
                self.__dict__.pop("offload_unmerged", None)

    def remember_unmerged(self) -> None:
        """Before the first merge into an offloaded base weight: the stored value an unmerge of every
        adapter puts back, where there is one to keep (``lorakit.layers.offload.remember``).
        ``lorakit.merge`` calls it on every layer before any merges, so that weights tied to each
        other are all found tied."""
        if "offload_unmerged" not in self.__dict__:
            self.__dict__["offload_unmerged"] = remember(self.base_layer)

    def _note_write(self) -> None:
        """After lorakit wrote the base weight: where a merge untied it (``untied_from``, see
        ``lorakit.inject.untie_tied_for_merge``), remember its bits, so that the tie is restored only
        over lorakit's own writes (a fingerprint, not the version counter, which a deepcopy resets)."""
        record = self.__dict__.get("untied_from")
        if record is not None:
            record["written"] = cast_print(self.base_layer.weight)

    def _adds_in_place(self, name: str) -> bool:
        """Whether merging (or unmerging) plain adapter ``name`` alone can add (subtract) its update
        into the weight in place: a floating-point weight of its own (float16 / bfloat16 / float32 /
        float64), where ``W + ΔW`` computed into a copy, as ``merged_weight`` does, and written back
        has the same bits (an in-place add computes in the wider of the two dtypes and rounds once
        into the weight's, as the copy path does); one pass over the weight instead of three
        (merge + unmerge of one Linear ran 2-2.8x PEFT's time, which adds in place)."""
        weight = self.base_layer._parameters.get("weight")
        return (name not in self.variants and isinstance(weight, torch.Tensor)
                and weight.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
                and not callable(getattr(self.base_layer, "dequantize_weight", None)))

    def _write_merge(self, pending: list[str], new: torch.Tensor, stamp: bool = True) -> None:
        weight = self.base_layer.weight
        weight.copy_(new.to(weight.dtype))
        self._note_merge(pending, stamp)

    def _note_merge(self, pending: list[str], stamp: bool = True) -> None:
        """The bookkeeping of a merge of ``pending`` written into the weight (``stamp``: see ``merge``)."""
        self._note_write()
        self.merged_adapters.extend(pending)
        stamps = self.__dict__.setdefault("merge_stamps", {})
        calls = self.__dict__.setdefault("merge_calls", {})
        call = max(calls.values(), default=-1) + 1
        for name in pending:
            if stamp:
                stamps[name] = self.merge_stamp(name)
            calls[name] = call

    @torch.no_grad()
    def unmerge(self, adapter_names: list[str] | None = None, *, check: bool = True) -> None:
        """Undo ``merge``: W ← W − scaling · ΔW, newest merge first.

        Refuses (``unmerge_blocker``) where an adapter changed since its merge, or the weight cannot
        be written; ``check=False`` skips that, for a caller that has just checked every layer
        (``lorakit.unmerge`` does, before unmerging any, so that a refusal leaves the whole model
        as it was).

        Taking out only some merged adapters: plain LoRA updates commute, so each is subtracted where
        it is; a variant's merge does not (DoRA rescales the whole weight and reads it for its column
        norm), so when one is involved every merge from the one that folded in the earliest adapter
        taken out onwards is undone, newest first, and the adapters that stay are merged again as they
        were: each merge's survivors in one merge, in their order, from the weight that merge started
        from (less the adapters taken out).
        """
        chosen, tail = self._unmerge_plan(adapter_names)
        if not chosen:
            return
        why = self.unmerge_blocker(adapter_names) if check else None
        if why:
            raise ValueError(f"{why}; the layer is unchanged")
        with materialized(self.base_layer, write=True):
            if len(chosen) < len(tail):
                calls = self.__dict__.get("merge_calls", {})
                again: dict[int, list[str]] = {}
                for name in tail:
                    if name not in chosen:
                        again.setdefault(calls.get(name, -1), []).append(name)
                self._unmerge_in_order(tail)
                for _, names in sorted(again.items()):
                    self._write_merge(names, self._folded(names))
            else:
                self._unmerge_in_order(chosen)
        kept = self.__dict__.pop("offload_unmerged", None) if not self.merged_adapters else None
        if kept is not None:
            put_back(self.base_layer, kept)

    def _unmerge_plan(self, adapter_names: list[str] | None) -> tuple[list[str], list[str]]:
        """``(adapters to take out, adapters unmerge subtracts)``: the second is longer where a
        variant's merge makes the later merges come out and go back in."""
        names = list(self.merged_adapters) if adapter_names is None else list(adapter_names)
        chosen = [n for n in self.merged_adapters if n in names]
        if not chosen:
            return [], []
        merged = self.merged_adapters
        tail = merged[merged.index(chosen[0]):]
        if len(chosen) < len(tail) and any(n in self.variants for n in tail):
            # back to the start of the merge that folded in chosen[0]: the variants merged with it
            # read the weight as it was before that merge
            calls = self.__dict__.get("merge_calls", {})
            first = calls.get(chosen[0])
            start = next((i for i, n in enumerate(merged) if first is not None and calls.get(n) == first),
                         merged.index(chosen[0]))
            return chosen, merged[start:]
        return chosen, chosen

    def _stamped_tensors(self, name: str) -> list[torch.Tensor]:
        tensors = [self.lora_A[name], self.lora_B[name]]
        variant = self.variants.get(name)
        if variant is not None:  # its own tensors, as saved (``saved_stores``: layer attribute -> disk name)
            tensors += [getattr(self, attr)[name] for attr in variant.saved_stores]
        return tensors

    def merge_stamp(self, name: str) -> tuple:
        """A fingerprint of what adapter ``name`` adds when merged: its scaling and the exact bits
        of its tensors (A, B and a variant's own, such as DoRA's magnitude), with their dtypes.

        The bits alone (``bits_print``); the fingerprints of the tensors' casts to narrower dtypes,
        by which ``unmerge`` recognises a cast of the model (``model.half()``, also through a narrower
        dtype and back), are taken only when a cast may come: ``_apply``, which every module cast
        and move runs, takes them first. They were four fifths of a merge's fingerprinting (a merge
        of the embedded model's 210 layers spent 146 ms in it against 100 in the updates, under cProfile)."""
        return float(self.scaling[name]), tuple(bits_print(t) for t in self._stamped_tensors(name))

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` (``.to``, ``.half()``, ``.float()``, ...), after completing the merge
        stamps of unchanged merged adapters with their casts' fingerprints (``merge_stamp``)."""
        stamps = self.__dict__.get("merge_stamps")
        for name, (scaling, prints) in list((stamps or {}).items()):
            if name in self.lora_A._parameters and any(p[2] is None for p in prints):
                tensors = self._stamped_tensors(name)
                if len(tensors) == len(prints):
                    stamps[name] = scaling, tuple(with_chains(p, t) for p, t in zip(prints, tensors))
        return super()._apply(fn, recurse)

    def unmerge_blocker(self, adapter_names: list[str] | None = None) -> str | None:
        """Why ``unmerge(adapter_names)`` would write wrong base weights, or None.

        Unmerging subtracts the update computed from the adapter's tensors as they are now; if they
        were changed after the merge (by hand, a load into the merged adapter, ...), that is not
        the update the merge added, and the weight would be left off by the difference. A cast of
        the whole model to another dtype changes the bits but not the update: that is let through.
        """
        _, subtracted = self._unmerge_plan(adapter_names)
        computed = unwritable_weight(self.base_layer, "merged") if subtracted else None
        if computed:  # (made computed after the merge, a parametrization or pruning added since; cast to float8)
            return f"cannot unmerge {subtracted}: {computed}"
        stamps = self.__dict__.get("merge_stamps", {})
        changed = []
        for name in subtracted:
            then = stamps.get(name)
            if then is None:
                continue
            tensors = self._stamped_tensors(name)
            same = then[0] == float(self.scaling[name]) and len(then[1]) == len(tensors) and all(
                same_up_to_cast(a, t) for a, t in zip(then[1], tensors))
            if not same:
                changed.append(name)
        if not changed:
            return None
        return (f"adapter(s) {changed} changed (weights or scaling) after being merged into this layer's weight: "
                f"unmerging would subtract another update than the merge added and leave the base weight wrong. "
                f"Put the adapter back as it was when merged to unmerge it, or reload the base model")

    def _unmerge_in_order(self, chosen: list[str]) -> None:
        weight = self.base_layer.weight
        for name in reversed(chosen):
            variant = self.variants.get(name)
            if variant is not None:
                weight.copy_(variant.unmerged_weight(self, name).to(weight.dtype))
            elif self._adds_in_place(name):  # (the same bits as the copy below)
                weight.sub_(self.delta_weight(name))
            else:
                weight.copy_((weight.to(torch.promote_types(weight.dtype, torch.float32)) - self.delta_weight(name))
                             .to(weight.dtype))
            self._note_write()
            self.merged_adapters.remove(name)
            self.__dict__.get("merge_stamps", {}).pop(name, None)
            self.__dict__.get("merge_calls", {}).pop(name, None)

    def merge_order(self, adapter_names: list[str] | None = None) -> list[str]:
        """The adapters ``merge(adapter_names)`` would fold in here (default: the active ones), in the
        order the forward applies them (the active order), then any inactive ones as given."""
        names = self.active_adapters if adapter_names is None else adapter_names
        ordered = [n for n in self.active_adapters if n in names] + [n for n in names if n not in self.active_adapters]
        return [n for n in dict.fromkeys(ordered) if n in self.lora_A and n not in self.merged_adapters]

    def exact_when_merged(self, merged: list[str], active: list[str] | None = None) -> bool:
        """Whether this layer, with ``merged`` folded into its weight, computes what its active
        adapters (or ``active``, a set about to be made active) compute unmerged.

        Plain LoRA updates add up in any order. An adapter with a variant (DoRA) does not: its forward
        rescales the output so far and reads the base weight for its column norm. Where one is involved,
        the merged adapters must therefore be the first ones the forward applies (in the active order),
        with no variant adapter left unmerged after them.
        """
        order = [n for n in (self.active_adapters if active is None else active) if n in self.lora_A]
        if not any(n in self.variants for n in [*order, *merged]):
            return True
        return merged == order[: len(merged)] and not any(n in self.variants for n in order[len(merged):])

    def merge_would_change(self, adapter_names: list[str] | None = None) -> str | None:
        """Why merging ``adapter_names`` here would change what the layer computes, or None
        (``exact_when_merged``, and a weight merge can write: ``why_not_mergeable``)."""
        pending = self.merge_order(adapter_names)
        if not pending:
            return None
        blocked = self.why_not_mergeable()
        if blocked:
            return f"cannot merge {pending}: {blocked}"
        if self.exact_when_merged(self.merged_adapters + pending):
            return None
        order = [n for n in self.active_adapters if n in self.lora_A]
        return (f"merging {pending} with {order} active, where a DoRA adapter is involved, would change the "
                f"output (DoRA rescales what the adapters before it add and reads the weight for its column "
                f"norm): merge the active adapters in their order, all of them or the first ones up to the "
                f"last DoRA adapter")

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.r[n]} scale={self.scaling[n]:g}" for n in self.lora_A)
        return f"adapters=[{ranks}], active={self.active_adapters}, merged={self.merged_adapters}"
