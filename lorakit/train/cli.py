"""``lorakit train | generate | chat | eval | merge``.

``lorakit train`` with no arguments is the demo: LoRA on the embedded SmolLM2-135M-Instruct, the
bundled Rotten Tomatoes sentiment task, a before/after table at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

from lorakit.train.config import HELP, TrainConfig


def _quiet_transformers(pick_threads: bool = True) -> None:
    """Silence transformers' load progress bars and generation chatter; pick the thread count
    (``lorakit train`` leaves that to ``train``, which honours ``--threads``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if pick_threads:
        from lorakit.train.generate import auto_threads

        auto_threads()


# --------------------------------------------------------------------------- train
def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; the help shows the dataclass default."""
    types = {"str": str, "int": int, "float": float}
    for f in fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        shown = "empty" if default is None else default
        help_text = f"{HELP[f.name]} (default: {shown})"
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
            continue
        kind = type(default).__name__ if default is not None else ("float" if f.name == "lr" else "str")
        kwargs: dict[str, Any] = {"type": types[kind], "default": argparse.SUPPRESS, "help": help_text}
        if f.name == "method":
            kwargs["choices"] = ("lora", "qlora", "full")
        if f.name == "precision":
            kwargs["choices"] = ("auto", "fp32", "bf16")
        p.add_argument(flag, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < ``--config`` YAML (or the resumed run's saved config) < flags given."""
    names = [f.name for f in fields(TrainConfig) if f.name != "extra"]
    given = {n: getattr(args, n) for n in names if hasattr(args, n)}
    if args.resume is not None and not args.resume.strip():
        raise ValueError("--resume needs the run directory to continue, got an empty path")
    if args.resume and args.config:
        raise ValueError("--config cannot be combined with --resume: a resumed run uses its own train_config.yaml "
                         f"(in {args.resume}); flags given with --resume override single options")
    if args.resume and "output" in given:
        raise ValueError(f"--output cannot be combined with --resume: the run continues in its own directory "
                         f"({args.resume})")
    if args.resume:
        from lorakit.train.loop import load_run_config

        base = load_run_config(args.resume).to_dict()
        if given and _first_process():
            print(f"warning: overriding the saved configuration of {args.resume} with {sorted(given)}", file=sys.stderr)
        base["output"] = args.resume
    elif args.config:
        from lorakit.train.config import read_yaml_mapping

        written = read_yaml_mapping(args.config)
        base = TrainConfig.from_dict(written, where=args.config).to_dict()
    else:
        base = TrainConfig().to_dict()
    if "epochs" in given and "max_steps" not in given:
        # a max_steps the --config file sets itself (not 0) wins over --epochs, as the flag's help says
        if args.config and base["max_steps"] and any(str(k).replace("-", "_") == "max_steps" for k in written):
            if _first_process():
                print(f"warning: --epochs is ignored: {args.config} sets max_steps ({base['max_steps']}); give "
                      "--max-steps 0 to train by epochs", file=sys.stderr)
        else:
            given["max_steps"] = 0  # --epochs alone means "train for that many epochs"
    base.update(given)
    cfg = TrainConfig.from_dict(base, where="command line")
    if cfg.method == "full" and not args.resume:
        # The adapter options mean nothing to a full fine-tune; say so rather than ignore them silently.
        defaults = TrainConfig()
        ignored = [n for n in ("rank", "alpha", "dropout", "target_modules")
                   if n in given or getattr(cfg, n) != getattr(defaults, n)]
        if ignored and _first_process():
            flags = ", ".join("--" + n.replace("_", "-") for n in ignored)
            print(f"warning: --method full trains every weight: ignoring {flags} (adapter options, for lora / "
                  "qlora only)", file=sys.stderr)
    return cfg


def _stderr_is_terminal() -> bool:
    """Whether stderr is a terminal: the progress bar goes there only then (redirected to a file, its
    redrawn frames would fill it; the run prints a line every --logging-steps instead)."""
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (ValueError, OSError, AttributeError):  # closed, or a stand-in without isatty
        return False


def _first_process() -> bool:
    """Not one of the later processes of a torchrun launch (they stay quiet: the first one speaks)."""
    return os.environ.get("RANK", "0") in ("", "0")


def process_tag() -> str:
    """``"[rank N] "`` in a later process of a torchrun launch, else ``""``: its errors still print
    (an error of its own must never be hidden), marked, since torchrun interleaves the processes' output."""
    return "" if _first_process() else f"[rank {os.environ['RANK']}] "


def cmd_train(args: argparse.Namespace) -> int:
    """Handler of ``lorakit train``."""
    _quiet_transformers(pick_threads=False)  # train() samples the machine once, after --threads
    from lorakit.train.loop import NonFiniteLossError, shell_quote, train

    cfg = config_from_args(args)
    log = stdout_log()
    try:
        result = train(cfg, resume=bool(args.resume), progress=not args.no_progress and _stderr_is_terminal(), log=log)
    except NonFiniteLossError as exc:
        print(f"{process_tag()}lorakit train: error: {exc}", file=sys.stderr)
        return 1
    if result.interrupted:
        return 130
    if not _first_process():
        return 0
    where = (f"--model {shell_quote(str(result.run_dir / 'model'))}" if cfg.method == "full"
             else f"--adapter {shell_quote(str(result.run_dir))}")
    from lorakit.train.data import BUILTIN_TASK

    builtin = cfg.data is None or cfg.data == BUILTIN_TASK
    log(f"\ntry it:  lorakit generate {where} " + ('"Review: a tender, funny film."' if builtin else '"<a prompt like your data\'s>"'))
    return 0


def stdout_log() -> Callable[[str], None]:
    """``print`` for a training run's messages that outlives its stdout.

    Where stdout fails (``lorakit train | head``: the reader went away; ``> /dev/full``), the run
    goes on and its messages go to stderr from then on (log.jsonl has every step anyway). Before,
    the failed write ended the run: a run without a checkpoint was deleted, a later one stopped with
    no resume hint, and ``/dev/full`` read as "No space left on device" for the run directory.
    """
    out: list[Any] = []  # (stderr, once stdout has failed)

    def log(text: str) -> None:
        if not out:
            try:
                print(text, flush=True)
                return
            except (OSError, ValueError):  # (a BrokenPipeError is an OSError; ValueError: stdout was closed)
                out.append(sys.stderr)
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    try:
                        os.dup2(devnull, sys.stdout.fileno())  # what is still buffered there goes nowhere at exit
                    finally:
                        os.close(devnull)
                with contextlib.suppress(OSError, ValueError):
                    print("lorakit train: stdout cannot be written any more (a pipe's reader went away?); the run "
                          "goes on, its messages follow here", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError, ValueError):
            print(text, file=out[0], flush=True)

    return log


# --------------------------------------------------------------------------- inference commands
def _add_model_flags(p: argparse.ArgumentParser, adapter_required: bool = False, several: bool = False) -> None:
    if several:  # generate: --adapter NAME=DIR may repeat; --use picks one per prompt
        p.add_argument("--adapter", action="append", default=None, metavar="[NAME=]DIR",
                       help="a run directory from `lorakit train` or a PEFT adapter directory; repeat as "
                       "NAME=DIR to load several adapters and pick one per prompt with --use "
                       "(default: none, the base model)")
    else:
        p.add_argument("--adapter", required=adapter_required, default=None,
                       help="a run directory from `lorakit train` or a PEFT adapter directory"
                       + ("" if adapter_required else " (default: none, the base model)"))
    p.add_argument("--model", default=None,
                   help="base model: transformers directory or .gguf (default: the adapter's base model, "
                   "else the embedded SmolLM2-135M-Instruct)")


def _add_merge(p: argparse.ArgumentParser) -> None:
    p.add_argument("--merge", action="store_true",
                   help="fold the adapter into the base weights in memory first: decoding at the base model's "
                   "speed; on a bf16 base the merged weights are rounded to bf16, so results (replies, "
                   "eval's loss) can differ slightly (default: keep the adapter unmerged, exact)")


def _add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default=None, choices=("auto", "fp32", "bf16"),
                   help="weights precision (default: a `lorakit train` run's own precision, else auto = bf16 "
                   "base weights where the CPU supports bf16)")


def cmd_generate(args: argparse.Namespace) -> int:
    """Handler of ``lorakit generate``."""
    _quiet_transformers()
    from lorakit.train.data import encode_prompt
    from lorakit.train.generate import greedy_generate, load_for_inference

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    from lorakit.multi import adapter_batch, check_uses, load_named_adapters, parse_adapter_args
    from lorakit.train.data import check_text

    specs = parse_adapter_args(args.adapter)
    named = [(n, d) for n, d in specs if n is not None]
    uses = list(args.use or [])
    if args.merge and (named or len(specs) > 1):
        raise ValueError("--merge folds one adapter into the base weights: give one --adapter DIR (no NAME=, "
                         "no --use); several adapters run unmerged as a mixed batch")
    if uses and not named:
        raise ValueError("--use NAME needs adapters loaded with --adapter NAME=DIR")
    # Several --use: each positional argument is one (quoted) prompt; else the words form one prompt.
    prompts = list(args.prompt) if len(uses) > 1 else [" ".join(args.prompt)]
    for i, prompt in enumerate(prompts):
        which = f"prompt {i + 1}" if len(prompts) > 1 else "the prompt"
        if not prompt.strip():
            raise ValueError(f"{which} is empty: give the text to " + ("continue" if args.raw else "answer"))
        check_text(prompt, which)
    if args.system is not None:
        check_text(args.system, "--system")
        if args.raw:  # (it was ignored silently: --raw continues the text, no chat template, no system turn)
            raise ValueError("--system is a chat turn, and --raw continues the prompt as plain text without the "
                             "chat template: give one of them")
    if args.precision is None and len(specs) > 1:
        from lorakit.train.generate import read_run_info

        recorded = {d: read_run_info(d).get("precision") for _, d in specs if Path(d).is_dir()}
        if len({p for p in recorded.values() if p}) > 1:
            raise ValueError(f"the adapters' runs used different precisions ({recorded}): all run on one base, so "
                             "choose one with --precision")
    model, tok, info = load_for_inference(args.model, specs[0][1] if specs else None, args.precision, merge=args.merge)
    if named:  # reload every adapter under its own name (load_for_inference named the first "default")
        from lorakit import delete_adapter
        from lorakit.inject import get_state

        if get_state(model) is not None and "default" in get_state(model).configs:
            delete_adapter(model, "default")
        load_named_adapters(model, named)
        if not uses and len(named) > 1:
            raise ValueError(f"{len(named)} adapters loaded: say which one each prompt uses with --use NAME")
        uses = check_uses(model, uses or [named[0][0]], len(prompts))
    ids = []
    for prompt in prompts:
        if args.raw:
            ids.append(tok(prompt)["input_ids"])
        else:
            # (an explicit --system "" is an empty system turn, as --system "  " was: not the template's default)
            msgs = ([{"role": "system", "content": args.system}] if args.system is not None else []) + [
                {"role": "user", "content": prompt}]
            ids.append(encode_prompt(tok, msgs))
    with adapter_batch(model, uses) if named else contextlib.nullcontext():  # one batch, a row per prompt
        replies = greedy_generate(model, tok, ids, args.max_new_tokens, info["amp"])
    if len(prompts) == 1:
        print(replies[0].strip())
    else:
        for use, reply in zip(uses, replies):
            print(f"[{use}] {reply.strip()}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Handler of ``lorakit chat``."""
    _quiet_transformers()
    from lorakit.train.generate import chat_loop, load_for_inference

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.system is not None:
        from lorakit.train.data import check_text

        check_text(args.system, "--system")  # (before loading; it ended the session at the first message)
    model, tok, info = load_for_inference(args.model, args.adapter, args.precision, merge=args.merge)
    return chat_loop(model, tok, args.max_new_tokens, info["amp"], args.system)


def cmd_eval(args: argparse.Namespace) -> int:
    """Handler of ``lorakit eval``."""
    _quiet_transformers()
    from lorakit.train.data import load_examples
    from lorakit.train.generate import evaluate, fit_to_positions, format_metric, load_for_inference, read_run_info

    if args.max_length is None:  # as the run evaluated itself, so its table is reproduced
        run_length = read_run_info(args.adapter).get("config", {}).get("max_length") if args.adapter else None
        args.max_length = run_length if isinstance(run_length, int) and not isinstance(run_length, bool) else 512
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--max-length", args.max_length, 1),
                               ("--max-samples", args.max_samples, 0)):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}" + (" (0 = all)" if least == 0 else "") + f", got {value}")
    examples = load_examples(args.data, "test")  # validated before the model is loaded
    if args.max_samples:
        examples = examples[: args.max_samples]
    model, tok, info = load_for_inference(args.model, args.adapter, args.precision, merge=args.merge)
    max_length = fit_to_positions(model, args.max_length, lambda text: print(text, file=sys.stderr))
    res = evaluate(model, tok, examples, max_length, args.batch_size, info["amp"])
    if res["n_dropped"]:  # (as train warns for its data)
        print(f"warning: eval data: dropped {res['n_dropped']} examples with no answer tokens within "
              f"max_length={max_length}", file=sys.stderr)
    report = {"adapter": args.adapter, "merged": args.merge,
              "model": info.get("model") or "SmolLM2-135M-Instruct (embedded)",
              "data": args.data, "n": res["n"], "n_dropped": res["n_dropped"], "loss": res["loss"], "accuracy": res["accuracy"],
              "n_accuracy": res["n_accuracy"], "n_generated": res["n_generated"]}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"model     {report['model']}" + (f" + adapter {args.adapter}" if info["adapter"] else "")
              + (" (merged)" if args.merge else ""))
        print(f"data      {args.data} ({res['n']} examples)")
        print(f"loss      {format_metric(res['loss'])}  (cross-entropy per label token: the answers; every "
              "token of a plain-text line)")
        print(f"accuracy  {format_metric(res['accuracy'], True)}  (exact match of the generated answer, "
              f"{res['n_accuracy']} examples)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Handler of ``lorakit merge``: adapter folded into the weights, saved as a plain model."""
    _quiet_transformers()
    from lorakit.io import check_new_directory, write_new_directory
    from lorakit.train.generate import is_full_finetune_run, load_for_inference

    out = Path(args.out)
    check_new_directory(out)  # before the model loads
    if is_full_finetune_run(args.adapter):
        raise ValueError(f"--adapter {args.adapter!r} is a full fine-tune run: its model/ is already a plain "
                         f"transformers model with nothing to merge (use {str(Path(args.adapter) / 'model')!r} "
                         "directly, e.g. --model with generate / eval)")
    # merge=True: a QLoRA run's adapter goes into the dense base (the usual QLoRA export), as
    # generate / eval --merge do, not into the NF4-rounded weights it trained against
    plain, tok, _ = load_for_inference(args.model, args.adapter, merge=True)
    plain.config.use_cache = True

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    write_new_directory(out, write)
    print(f"merged model written to {out} (load it with AutoModelForCausalLM.from_pretrained)")
    from lorakit.train.generate import read_run_info

    ran = read_run_info(args.adapter).get("precision") if Path(args.adapter).is_dir() else None
    if ran:  # generate --model takes auto (bf16 where the CPU has it), the adapter its run's precision
        close = "" if ran == "fp32" else " (to bf16 rounding: merged weights round otherwise than base + adapter)"
        print(f"(the run used {ran}: give --precision {ran} to generate / eval --model {out} to compute as the "
              f"adapter did{close})")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """List the model cache (the embedded model's conversions), or with ``--clean`` delete all but
    the entry this installation loads."""
    from lorakit.analysis.estimate import human as size
    from lorakit.models import cache_dir, cache_entries, clean_cache

    what = {"in use": "in use: the entry this installation loads",
            "other": "another version's conversion (other environments may load it)",
            "incomplete": "no valid completion record (damaged, an older lorakit's conversion, or not lorakit's)",
            "temporary": "a conversion's temporary (running now, or left by one that was killed)",
            "leftover": "what a removal set aside and could not delete"}
    root = cache_dir()
    print(f"lorakit's cache: {root} (set LORAKIT_CACHE_DIR to move it)")
    if args.clean:
        removed, failed = clean_cache()
        for e in removed:
            print(f"  removed {e.path.relative_to(root)} ({size(e.bytes)}; {e.state})")
        for e, why in failed:
            print(f"lorakit cache: error: could not remove {e.path}: {why}", file=sys.stderr)
        print(f"freed {size(sum(e.bytes for e in removed))}" if removed else "nothing removed")
    entries = cache_entries()
    for e in entries:
        print(f"  {e.path.relative_to(root)}  {size(e.bytes)}  {what[e.state]}")
    if not entries:
        print("  (no models cached)")
    else:
        print(f"total {size(sum(e.bytes for e in entries))}")
        if not args.clean and any(e.state != "in use" for e in entries):
            print("(lorakit cache --clean deletes all but the entry in use; temporaries only an hour after their last "
                  "change)")
    return 2 if args.clean and failed else 0


# --------------------------------------------------------------------------- registration
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add train / generate / chat / eval / merge / cache to the ``lorakit`` parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "train", help="fine-tune a causal LM with LoRA (no arguments: the CPU demo)", formatter_class=fmt,
        description="Fine-tune a causal LM with LoRA (or fully). With no arguments: LoRA on the embedded "
        "SmolLM2-135M-Instruct, the bundled Rotten Tomatoes sentiment task, a before/after table.\n"
        "Options come from the defaults below, then --config FILE.yaml, then the flags given.\n"
        "Several processes (data parallel, gloo): torchrun --nproc-per-node N -m lorakit.cli train ...;\n"
        "--batch-size is then per process, and the run equals one process with N times the batch.")
    p.add_argument("--config", default=None, help="YAML file of option: value (default: none)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint (default: start a new run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar; print a line every --logging-steps instead (the default when stderr is not a terminal)")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("generate", help="generate a reply to a prompt (greedy; several adapters: one prompt per --use)")
    p.add_argument("prompt", nargs="+", help="the user message (rendered with the chat template); with "
                   "several --use, one quoted prompt per --use")
    _add_model_flags(p, several=True)
    p.add_argument("--use", action="append", default=None, metavar="NAME",
                   help="adapter (loaded as --adapter NAME=DIR, or __base__ for none) for the prompt at the "
                   "same position; repeat once per prompt: all prompts run as one mixed-adapter batch")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    p.add_argument("--system", default=None, help="system message (\"\" for an empty one; default: the template's own; not with --raw)")
    p.add_argument("--raw", action="store_true", help="continue the prompt as plain text, no chat template")
    _add_merge(p)
    _add_precision(p)
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("chat", help="interactive chat (Ctrl-D or /exit to quit; Ctrl-C stops a reply)")
    _add_model_flags(p)
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply at most (default: 256)")
    p.add_argument("--system", default=None, help="system message (\"\" for an empty one; default: the template's own)")
    _add_merge(p)
    _add_precision(p)
    p.set_defaults(func=cmd_chat)

    p = subparsers.add_parser("eval", help="held-out loss and answer accuracy on a JSONL file")
    _add_model_flags(p)
    p.add_argument("--data", required=True, help="JSONL file (any training format) or 'rotten_tomatoes' "
                   "(the bundled task's held-out split)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--max-samples", type=int, default=0, help="evaluate the first N examples only (default: 0 = all)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per batch (default: 16)")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate examples to N tokens; an example whose answer is cut away counts in neither "
                        "metric (default: the run's own max_length when --adapter is a run directory, else 512)")
    _add_merge(p)
    _add_precision(p)
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("merge", help="fold an adapter into the base weights; save a plain model")
    _add_model_flags(p, adapter_required=True)
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.set_defaults(func=cmd_merge)

    p = subparsers.add_parser(
        "cache", help="list the model cache (the embedded model's conversions); --clean deletes old ones",
        description="List lorakit's model cache: the embedded model converted once per installation "
        "(~520 MB each; entries of other transformers / gguf versions stay, as other environments may use "
        "them).")
    p.add_argument("--clean", action="store_true",
                   help="delete every entry but the one this installation loads (another environment converts "
                        "again, ~20 s, on its next load; an entry that such an environment is loading at that "
                        "moment is left and named, exit status 2); a temporary only an hour after its last change")
    p.set_defaults(func=cmd_cache)
