"""``lorakit lowrank | recommend | estimate | inspect | extract | resize``: the low-rank lab's commands.

Each handler prints a table (or JSON with ``--json``) and, where a picture helps, writes PNG plots
into ``--out`` (next to the JSON report, or inside the adapter directory it wrote).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

# estimate, names, plots and sweep import no torch; the commands that need torch import their
# modules when they run, so that `lorakit --help` does not wait for it
from lorakit.analysis import estimate, names, plots, sweep

DEFAULT_OUT = "lorakit-lab"


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _emit(args: argparse.Namespace, report: dict[str, Any], text: str, name: str) -> None:
    """Print text or JSON; save the JSON report into --out when plots are on."""
    if getattr(args, "json", False):
        print(json.dumps(report, indent=2, default=str))
    else:
        print(text)
    out = getattr(args, "out", None)
    if out and not getattr(args, "no_plot", False):
        from lorakit.io import atomic_write_bytes  # (whole or not at all, as the plots)

        atomic_write_bytes(Path(out) / f"{name}.json", json.dumps(report, indent=2, default=str).encode())


def _note_plots(args: argparse.Namespace, paths: list[Path]) -> None:
    if paths and not getattr(args, "json", False):
        print("plots: " + ", ".join(str(p) for p in paths))


# ---- lowrank ---------------------------------------------------------------------------------
def cmd_lowrank(args: argparse.Namespace) -> int:
    """``lorakit lowrank``: parameter table, synthetic SVD demo, optional model spectrum."""
    from lorakit.analysis import lowrank

    if args.module is not None and args.model is None:  # (it was ignored, a bad regex too)
        raise ValueError("--module selects the matrices of --model: give --model (no value: the embedded model)")
    rows = lowrank.parameter_table(args.d, args.k, args.ranks)
    text = [f"LoRA factors for a {args.d} x {args.k} matrix ({args.d * args.k:,} parameters)",
            _table([(r["rank"], f"{r['params_A']:,}", f"{r['params_B']:,}", f"{r['lora_params']:,}",
                     f"{r['compression']:.1f}x", f"{r['removed_pct']:.2f}%") for r in rows],
                   ("rank", "A (r x k)", "B (d x r)", "LoRA params", "compression", "removed"))]
    if args.size < 1:
        raise ValueError(f"--size must be >= 1 (the side of the synthetic matrix), got {args.size}")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be >= 0 and below 2**63 (as train's), got {args.seed}")
    too_big = [r for r in args.svd_ranks if r > args.size]
    if too_big:
        raise ValueError(f"--svd-ranks {too_big} exceed --size {args.size} (a {args.size} x {args.size} matrix "
                         f"has at most rank {args.size})")
    W = lowrank.synthetic_low_rank(args.size, args.size, args.true_rank, args.seed)
    errs = lowrank.reconstruction_errors(W, args.svd_ranks)
    text += ["", f"Truncated SVD of a {args.size} x {args.size} matrix of true rank {args.true_rank}",
             _table([(e["rank"], f"{e['abs_error']:.3e}", f"{e['rel_error']:.3e}", f"{100 * e['energy']:.2f}%")
                     for e in errs], ("rank", "‖W−W_r‖", "relative", "energy"))]
    report: dict[str, Any] = {"parameter_table": rows, "synthetic": {"size": args.size, "true_rank": args.true_rank,
                                                                     "rows": errs}}
    spectra = None
    if args.model is not None:
        weights, matched = lowrank.select_weights_counted(args.model, args.module)
        spectra = lowrank.spectrum_report(weights, args.ranks)
        report["model"] = {"source": args.model, "matching": matched, "shown": len(spectra), "matrices": spectra}
        ranks = list(args.ranks)
        label = "the embedded model" if args.model == "default" else Path(str(args.model)).name
        text += ["", f"Weight matrices of {label}: energy captured at rank r, effective rank (90% / 99%)",
                 _table([(n, "x".join(map(str, v["shape"])), *[f"{100 * v['energy'][r]:.1f}%" for r in ranks],
                          v["rank90"], v["rank99"]) for n, v in spectra.items()],
                        ("module", "shape", *[f"r={r}" for r in ranks], "r90", "r99"))]
        if matched > len(spectra):
            text.append(f"showing {len(spectra)} of {matched} matching matrices (the first in the weights files' "
                        f"order); narrow --module to choose others")
    _emit(args, report, "\n".join(text), "lowrank")
    if args.out and not args.no_plot:
        out = Path(args.out)
        made = [plots.plot_param_table(rows, out / "lowrank_params.png"),
                plots.plot_error_vs_rank({f"synthetic {args.size}x{args.size}, rank {args.true_rank}":
                                          ([e["rank"] for e in errs], [e["rel_error"] for e in errs])},
                                         out / "lowrank_error.png", true_rank=args.true_rank)]
        if spectra:
            made.append(plots.plot_spectra({n: v["singular_values"] for n, v in spectra.items()},
                                           out / "lowrank_spectrum.png", f"Spectrum of {label}"))
        _note_plots(args, made)
    return 0


# ---- recommend -------------------------------------------------------------------------------
def cmd_recommend(args: argparse.Namespace) -> int:
    """``lorakit recommend``: rule table (+ costs on --model) and/or the data-driven mode."""
    from lorakit.analysis import recommend

    report: dict[str, Any] = {}
    text: list[str] = []
    table_mode = args.task is not None or args.data_size is not None
    data_mode = args.adapter is not None or args.tuned is not None
    if args.base is not None and args.tuned is None:
        raise ValueError("--base needs --tuned (the fine-tuned model whose difference from --base is analysed)")
    if not table_mode and not data_mode:
        raise ValueError("give --task/--data-size (rule table) or --adapter / --tuned (data-driven mode)")
    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value < 1:  # (with --model they went into the memory estimate, which said "no estimate" and exit 0)
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.adapter is not None and args.tuned is not None:
        raise ValueError("give --adapter or --tuned (with --base), not both")
    if args.targets is not None and not args.targets:
        raise ValueError("--targets is empty: name modules (q_proj,v_proj), or all-linear")
    if args.targets is not None and args.adapter is not None and not table_mode:
        raise ValueError("--targets applies to --tuned and to the cost on --model; an adapter's own modules are "
                         "all analysed")
    if args.energy is not None and not data_mode:
        raise ValueError("--energy applies to the data-driven mode (--adapter, or --tuned with --base)")
    if table_mode:
        if args.task is None or args.data_size is None:
            raise ValueError("the rule table needs both --task and --data-size")
        size = args.model_size
        if size is None:
            if args.model is None:
                raise ValueError("give --model-size (7B, 13B, 70B) or --model to read it from")
            size = recommend.model_total_params(args.model)
        rec = recommend.recommend_rank(args.task, args.data_size, size)
        report["recommendation"] = rec
        text += [f"rank {rec['rank']}, alpha {rec['alpha']}", rec["reasoning"]]
        if args.model is not None:
            targets = args.targets or ["q_proj", "v_proj"]
            cost = recommend.model_cost(args.model, rec["rank"], tuple(targets), args.batch_size, args.seq_len,
                                        args.precision)
            report["cost"] = cost
            where = "the embedded model" if args.model == "default" else args.model
            text += ["", f"On {where} with targets {','.join(targets)}: {cost['modules']} modules, "
                     f"{cost['trainable_params']:,} trainable parameters "
                     f"({100 * cost['trainable_params'] / cost['total_params']:.3f}% of {cost['total_params']:,}), "
                     f"adapter ≈ {estimate.human(cost['adapter_bytes'])} on disk"]
            if cost.get("memory"):
                m = cost["memory"]
                text.append(f"training step ({args.batch_size} x {args.seq_len} tokens, {args.precision}, AdamW): "
                            f"peak ≈ {estimate.human(m['peak'])} (weights {estimate.human(m['weights'])}, "
                            f"activations {estimate.human(m['activations'])})")
            if cost.get("memory_note"):
                text.append(cost["memory_note"] if cost.get("memory") is None else f"note: {cost['memory_note']}")
            if cost["narrower_than_rank"]:
                narrow = cost["narrower_than_rank"]
                text.append(f"warning: rank {rec['rank']} is above min(in, out) of {len(narrow)} targeted module(s), "
                            f"e.g. {narrow[0]}: the update there cannot reach that rank (use a lower rank there, "
                            "e.g. in rank_pattern)")
    if data_mode:
        energy = 0.99 if args.energy is None else args.energy
        dd = recommend.data_driven_ranks(adapter=args.adapter, base=args.base, tuned=args.tuned,
                                         targets=args.targets if args.tuned else None, energy=energy,
                                         progress=True)
        report["data_driven"] = dd
        if text:
            text.append("")
        text += [f"Effective rank of each ΔW ({'adapter ' + str(args.adapter) if args.adapter else 'tuned − base'})",
                 _table([(r["module"], r["max_rank"], r["rank90"], r["rank99"], f"{r['norm']:.3g}", r["suggested"],
                          f"{100 * r['kept']:.1f}%") for r in dd["modules"]],
                        ("module", "max", "r90", "r99", "‖ΔW‖", "suggested", "kept")),
                 f"suggested: r = {dd['r']}, lora_alpha = {dd['alpha']}, rank_pattern = {json.dumps(dd['rank_pattern'])}, "
                 f"alpha_pattern = {json.dumps(dd['alpha_pattern'])} (scaling alpha/r = 2 on every module)"]
        capped = [r for r in dd["modules"] if r["capped"]]
        if capped:
            low = min(capped, key=lambda r: r["kept"])
            text.append(f"note: {len(capped)} module(s) needed more than their capped rank for {energy:g} of ‖ΔW‖² "
                        f"and keep less (least: {low['module']}, {100 * low['kept']:.1f}%)")
        if dd["noise_only"]:
            text.append(f"note: {len(dd['noise_only'])} module(s) left out, e.g. {dd['noise_only'][0]}: their change "
                        "is no larger than rounding the tuned weights to their dtype gives")
    _emit(args, report, "\n".join(text), "recommend")
    if data_mode and args.out and not args.no_plot:
        rows = report["data_driven"]["modules"]
        _note_plots(args, [plots.plot_module_bars([r["module"] for r in rows],
                                                  {"90% energy": [r["rank90"] for r in rows],
                                                   "99% energy": [r["rank99"] for r in rows]},
                                                  Path(args.out) / "recommend_ranks.png", "effective rank",
                                                  "Effective rank of ΔW per module")])
    return 0


# ---- estimate --------------------------------------------------------------------------------
def cmd_estimate(args: argparse.Namespace) -> int:
    """``lorakit estimate``: memory breakdown and FLOPs per method."""
    if not args.methods:
        raise ValueError(f"--methods is empty; give one or more of {', '.join(estimate.METHODS)}")
    shape = estimate.load_shape(args.model)
    results = [estimate.estimate_memory(shape, method=m, batch_size=args.batch_size, seq_len=args.seq_len,
                                        precision=args.precision, optimizer=args.optimizer,
                                        gradient_checkpointing=args.gradient_checkpointing, r=args.r,
                                        target_modules=tuple(args.targets), attention=args.attention,
                                        optimizer_impl=args.optimizer_impl, state_precision=args.state_precision)
               for m in args.methods]
    narrow = estimate.rank_above_width(shape, args.r, args.targets)
    if narrow and any(m != "full" for m in args.methods):
        print(f"warning: --r {args.r} is above min(in, out) of {', '.join(narrow)}: the update there cannot have "
              f"that rank, yet r x (in + out) parameters are counted (and would train)", file=sys.stderr)
    h = estimate.human
    text = [f"{shape.name}: {shape.total_params():,} parameters; {args.batch_size} x {args.seq_len} tokens, "
            f"{args.precision}, {args.optimizer}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}",
            _table([(e.method, f"{e.trainable_params:,}", h(e.weights), h(e.gradients), h(e.optimizer_states),
                     h(e.activations), h(e.transient), h(e.peak), e.peak_phase, f"{e.flops_per_token / 1e9:.2f}")
                    for e in results],
                   ("method", "trainable", "weights", "grads", "optimizer", "activations", "transient", "peak",
                    "peak during", "GFLOP/token")),
            "assumptions: " + "; ".join(results[0].assumptions)]
    report = {"model": shape.name, "estimates": [e.to_dict() for e in results]}
    _emit(args, report, "\n".join(text), "estimate")
    if args.out and not args.no_plot:
        _note_plots(args, [plots.plot_memory_breakdown(report["estimates"], Path(args.out) / "estimate_memory.png",
                                                       f"{shape.name}, {args.batch_size}x{args.seq_len}, {args.precision}")])
    return 0


# ---- inspect / extract / resize --------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    """``lorakit inspect``: adapter summary; exit code 1 when it does not fit --base."""
    from lorakit.analysis import adapter_tools

    rep = adapter_tools.inspect_adapter(args.adapter, base=args.base, check_base=args.base is not None)
    c, t = rep["config"], rep["totals"]
    text = [f"adapter {rep['path']}: r={c['r']} alpha={c['lora_alpha']} rslora={bool(c['use_rslora'])} "
            f"dora={bool(c['use_dora'])} targets={rep['targets']}",
            f"{t['modules']} modules, {t['params']:,} parameters, {estimate.human(t['size_on_disk'])} on disk"
            + (f", other tensors: {', '.join(t['other_tensors'])}" if t["other_tensors"] else ""),
            _table([(r["module"], r["kind"], r["r"], f"{r['alpha']:g}", f"{r['scaling']:.4g}", f"{r['params']:,}",
                     f"{r['delta_norm']:.4g}", r["rank90"], r["rank99"]) for r in rep["modules"]],
                   ("module", "kind", "r", "alpha", "scaling", "params", "‖ΔW‖", "r90", "r99"))]
    text += [f"warning: {w}" for w in rep["warnings"]]
    if "loads" in rep:
        loads = rep["loads"]
        text.append(f"loads against {args.base}: {'yes' if loads['ok'] else 'NO'}")
        text += [f"  {p}" for p in loads["problems"]]
    _emit(args, rep, "\n".join(text), "inspect")
    if args.out and not args.no_plot:
        rows = rep["modules"]
        _note_plots(args, [plots.plot_module_bars([r["module"] for r in rows],
                                                  {"r": [r["r"] for r in rows], "90% energy": [r["rank90"] for r in rows],
                                                   "99% energy": [r["rank99"] for r in rows]},
                                                  Path(args.out) / "inspect_ranks.png", "rank", "Rank vs effective rank")])
    return 0 if rep.get("loads", {"ok": True})["ok"] else 1


def _surgery_text(rep: dict[str, Any], what: str) -> str:
    old = "old_r" in rep["modules"][0] if rep["modules"] else False
    rows = [((r["module"], r["old_r"]) if old else (r["module"],)) + (r["r"], f"{r['rel_error']:.4f}")
            for r in rep["modules"]]
    head = ("module", "old r", "r", "rel. error") if old else ("module", "r", "rel. error")
    lines = [f"{what} -> {rep['out']}", _table(rows, head),
             f"mean relative error {rep['mean_rel_error']:.4f}"]
    for s in rep.get("skipped", []):
        lines.append(f"skipped {s['tensor']}: {s['why']}")
    return "\n".join(lines)


def _surgery_plot(args: argparse.Namespace, rep: dict[str, Any], name: str) -> None:
    if args.no_plot or not rep["modules"]:
        return
    _note_plots(args, [plots.plot_module_bars([r["module"] for r in rep["modules"]],
                                              {"relative error": [r["rel_error"] for r in rep["modules"]]},
                                              Path(rep["out"]) / f"{name}_error.png", "‖ΔW − ΔW_r‖ / ‖ΔW‖",
                                              f"{name}: error per module")])


def cmd_extract(args: argparse.Namespace) -> int:
    """``lorakit extract``: truncated-SVD adapter of tuned − base."""
    from lorakit.analysis import adapter_tools

    rep = adapter_tools.extract_adapter(args.base, args.tuned, args.rank, args.out, alpha=args.alpha,
                                        targets=args.targets, energy=args.energy, progress=True)
    args_json = argparse.Namespace(json=args.json, out=None)
    _emit(args_json, rep, _surgery_text(rep, f"extracted rank-{args.rank} LoRA of {args.tuned} − {args.base}"), "extract")
    _surgery_plot(args, rep, "extract")
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    """``lorakit resize``: lower-rank adapter by truncated SVD of each ΔW."""
    from lorakit.analysis import adapter_tools

    rep = adapter_tools.resize_adapter(args.adapter, args.rank, args.out, energy=args.energy)
    args_json = argparse.Namespace(json=args.json, out=None)
    text = _surgery_text(rep, f"resized {args.adapter} to rank {args.rank}")
    text += f"\nparameters {rep['old_params']:,} -> {rep['new_params']:,}; max relative error {rep['max_rel_error']:.4f}"
    _emit(args_json, rep, text, "resize")
    _surgery_plot(args, rep, "resize")
    return 0


# ---- registration ----------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, out_default: str | None = DEFAULT_OUT) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    if out_default is not None:
        where = f"default {out_default}" if out_default else "default: none written"
        p.add_argument("--out", default=out_default or None, help=f"folder for the JSON report and PNG plots ({where})")
        p.add_argument("--no-plot", action="store_true", help="write no report or plot files")
    else:  # extract / resize: --out is the adapter they write
        p.add_argument("--no-plot", action="store_true", help="write no error plot (the adapter is still written)")


class _DefaultsHelp(argparse.HelpFormatter):
    """Appends a flag's default to its help text, unless the text already gives it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and "default" not in text and default not in (None, argparse.SUPPRESS)
                and not isinstance(default, bool)):
            shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            text = f"{text} (default: {shown})"
        return text


def _add(sub: Any, name: str, func: Callable[[argparse.Namespace], int], help_text: str,
         description: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=description, formatter_class=_DefaultsHelp)

    def run(args: argparse.Namespace) -> int:
        out = getattr(args, "out", None)  # checked before any work, not when the results are written
        if out and not getattr(args, "no_plot", False) and Path(out).exists() and not Path(out).is_dir():
            raise ValueError(f"--out {out!r} is a file, not a directory: choose another --out")
        if name != "sweep":  # (sweep's training runs pick their own threads, as lorakit train does)
            from lorakit.train.generate import auto_threads

            auto_threads()  # one thread per free core: on a busy machine two spin-wait (5-18x slower SVDs)
        return func(args)
    p.set_defaults(func=run)
    return p


def register(subparsers: Any) -> None:
    """Add the lab's subcommands to the ``lorakit`` parser."""
    p = _add(subparsers, "lowrank", cmd_lowrank, "low-rank demo: LoRA sizes, SVD error vs rank",
             "The lesson's LoRA parameter table, truncated-SVD reconstruction of a known-rank matrix, and "
             "the singular-value spectrum of a model's weights.")
    p.add_argument("--d", type=int, default=1000, help="rows of the matrix (default 1000)")
    p.add_argument("--k", type=int, default=1000, help="columns of the matrix (default 1000)")
    p.add_argument("--ranks", type=_ints, default=list(names.LESSON_RANKS), help="ranks for the table (1,2,4,...,64)")
    p.add_argument("--size", type=int, default=names.LESSON_SYNTHETIC["size"],
                   help=f"side of the synthetic matrix, >= 1 (default {names.LESSON_SYNTHETIC['size']})")
    p.add_argument("--true-rank", type=int, default=names.LESSON_SYNTHETIC["true_rank"],
                   help=f"rank of the synthetic matrix (default {names.LESSON_SYNTHETIC['true_rank']})")
    p.add_argument("--svd-ranks", type=_ints, default=list(names.LESSON_SYNTHETIC["ranks"]),
                   help="ranks for the reconstruction, each <= --size")
    p.add_argument("--seed", type=int, default=0, help="seed of the random matrices")
    p.add_argument("--model", nargs="?", const="default", default=None,
                   help="also analyse a model's weights: a local model directory, or no value for the embedded model")
    p.add_argument("--module", default=None,
                   help=f"regex on module names (default: layer 0's projections); the first "
                        f"{names.MAX_MATRICES} matching matrices (in layer order) are analysed, and the output says when more match")
    _common(p)

    p = _add(subparsers, "recommend", cmd_recommend, "recommend LoRA rank and alpha",
             "Recommend LoRA rank and alpha (the lesson's table), with costs on a real model, or from the "
             "effective rank of trained updates.")
    p.add_argument("--task", choices=names.TASKS, default=None, help="task kind, for the rule table's row")
    p.add_argument("--model-size", default=None,
                   help="7B, 13B or 70B, or another size with its unit (135M, 1.5B), mapped to the nearest column")
    p.add_argument("--data-size", type=int, default=None, help="number of training examples")
    p.add_argument("--model", nargs="?", const="default", default=None,
                   help="model to cost the recommendation on (directory, or no value for the embedded model)")
    p.add_argument("--targets", type=_names, default=None,
                   help="target modules; all-linear among them adds every linear but embeddings and the head (default: "
                        "q_proj,v_proj for the cost on --model; every changed linear for --tuned)")
    p.add_argument("--batch-size", type=int, default=4, help="batch size the costs are computed for")
    p.add_argument("--seq-len", type=int, default=512, help="sequence length the costs are computed for")
    p.add_argument("--precision", choices=estimate.PRECISIONS, default="bf16", help="precision of the costed step")
    p.add_argument("--adapter", default=None, help="data-driven mode: a trained adapter directory")
    p.add_argument("--tuned", default=None, help="data-driven mode: a fully fine-tuned model directory (its base: --base)")
    p.add_argument("--base", nargs="?", const="default", default=None,
                   help="base model of --tuned (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--energy", type=float, default=None,
                   help="data-driven mode: the fraction of each ‖ΔW‖² its suggested rank is to keep (default 0.99; "
                        "a rank capped at 64 or at the module's size keeps less: the 'kept' column)")
    _common(p, out_default="")

    p = _add(subparsers, "estimate", cmd_estimate, "memory and FLOPs of a training step",
             "Memory breakdown and FLOPs of one training step: full fine-tuning, LoRA, QLoRA.")
    p.add_argument("--model", nargs="?", const="default", default="7B",
                   help="preset 7B/13B/70B, a config.json, a model directory or .gguf file, or no value (or "
                        "'default') for the embedded model (default: 7B)")
    p.add_argument("--methods", type=_names, default=list(estimate.METHODS), help="methods to compare")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--precision", choices=estimate.PRECISIONS, default="bf16", help="weights and activations")
    p.add_argument("--optimizer", choices=estimate.OPTIMIZERS, default="adamw", help="optimizer of the trained weights")
    p.add_argument("--optimizer-impl", choices=estimate.OPTIMIZER_IMPLS, default="per-tensor",
                   help="AdamW's implementation (its temporary buffers differ)")
    p.add_argument("--state-precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help="dtype of AdamW's moments (default: the trainable weights' dtype, as torch.optim)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--targets", type=_names, default=["q_proj", "v_proj"],
                   help="LoRA target modules: names, or all-linear (every projection, as lorakit train's default "
                        "targets); default q_proj,v_proj (the LoRA paper's)")
    p.add_argument("--attention", choices=estimate.ATTENTIONS, default="sdpa",
                   help="attention kernel (eager keeps the scores for backward)")
    _common(p)

    p = _add(subparsers, "inspect", cmd_inspect, "what an adapter holds; does it fit a base",
             "Inspect a PEFT-format LoRA adapter: ranks, scaling, parameters, ‖ΔW‖ and effective rank per "
             "module, and whether it loads against a base.")
    p.add_argument("adapter", help="adapter directory")
    p.add_argument("--base", nargs="?", const="default", default=None,
                   help="check the adapter loads against this base (directory, or no value for the embedded model)")
    _common(p, out_default="")

    p = _add(subparsers, "extract", cmd_extract, "LoRA adapter from a fully fine-tuned model",
             "Extract a LoRA adapter approximating a fully fine-tuned model's difference from its base "
             "(truncated SVD per module).")
    p.add_argument("--base", nargs="?", const="default", default="default",
                   help="base model directory (default, or no value: the embedded model)")
    p.add_argument("--tuned", required=True, help="fully fine-tuned model directory")
    p.add_argument("--rank", type=int, required=True,
                   help="rank of the extracted adapter (the largest, with --energy; capped per module at "
                        "the weight's min(out, in))")
    p.add_argument("--out", required=True, help="output adapter directory")
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: rank)")
    p.add_argument("--targets", type=_names, default=None, help="module names/suffixes, all-linear among them for every linear too (default: all changed linears)")
    p.add_argument("--energy", type=float, default=None, help="per-module rank holding this energy (<= --rank)")
    _common(p, out_default=None)

    p = _add(subparsers, "resize", cmd_resize, "compress an adapter to a lower rank",
             "Compress a LoRA adapter to a lower rank by truncated SVD of each module's ΔW.")
    p.add_argument("adapter", help="adapter directory")
    p.add_argument("--rank", type=int, required=True, help="new rank (the largest, with --energy)")
    p.add_argument("--out", required=True, help="output adapter directory")
    p.add_argument("--energy", type=float, default=None, help="per-module rank holding this energy (<= --rank)")
    _common(p, out_default=None)

    p = _add(subparsers, "sweep", cmd_sweep, "train at several ranks and compare",
             "The lesson's exercise: train the same task at several LoRA ranks (alpha = 2r) for the same "
             "number of steps, then print and plot trainable parameters, held-out loss, accuracy and step time.")
    p.add_argument("--ranks", type=_ints, default=list(sweep.DEFAULT_RANKS),
                   help="ranks to train, each once (default 1,2,4,8,16,32,64)")
    p.add_argument("--max-steps", type=int, default=50,
                   help="optimizer steps per rank (default 50; 0 = one full epoch over the training data)")
    p.add_argument("--eval-samples", type=int, default=100, help="held-out examples per evaluation (default 100)")
    p.add_argument("--data", default=None, help="training JSONL (default: the bundled Rotten Tomatoes task)")
    p.add_argument("--eval-data", default=None,
                   help="held-out JSONL (default: the bundled task's held-out split when training on it; "
                        "with your own --data, no evaluation unless this is given)")
    p.add_argument("--model", nargs="?", const="default", default=None,
                   help="base model directory or .gguf (default, or no value: the embedded SmolLM2-135M)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: lorakit train's, 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="random seed of every run")
    p.add_argument("--output", default=None, help="parent directory of the runs (default runs/sweep-<time>)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-plot", action="store_true",
                   help="write no sweep.png (each run still writes its own loss.png, as lorakit train does)")


def cmd_sweep(args: argparse.Namespace) -> int:
    """Handler of ``lorakit sweep``."""
    import time

    from lorakit.train.config import TrainConfig

    base = TrainConfig(model=args.model, data=args.data, eval_data=args.eval_data, eval_samples=args.eval_samples,
                       max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, save_steps=0)
    out = Path(args.output or f"runs/sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    rows = sweep.run_sweep(base, args.ranks, out, log=(lambda s: None) if args.json else print)
    print(json.dumps(rows, indent=2) if args.json else sweep.sweep_table(rows))
    if not args.no_plot:
        written = sweep.plot_sweep(rows, out / "sweep.png")
        if not args.json:  # (--json output stays one JSON document)
            print(f"plot: {written}")
    return 0
