"""The ``lorakit`` command line.

Each feature area owns its subcommands in its own module and exposes ``register(subparsers)``;
this file only wires them together, so adding a command never touches another area's code.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

from lorakit import __version__

# Modules that contribute subcommands, in the order they appear in ``lorakit --help`` (both are part
# of the package: one missing is an installation error, raised, not a command left out of the help)
_COMMAND_MODULES = (
    "lorakit.train.cli",
    "lorakit.analysis.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA fine-tuning for PyTorch models: train, generate, merge, analyse adapters.",
    )
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lorakit`` console script; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # An ASCII-only stdout (PYTHONIOENCODING=ascii) raised UnicodeEncodeError on any reply or path with
    # a non-ASCII character (ending a chat, losing a generation): escape such characters instead
    for stream in (sys.stdout, sys.stderr):  # (only over "strict": the C locale's surrogateescape stays)
        if getattr(stream, "errors", None) == "strict":
            with contextlib.suppress(AttributeError, ValueError, OSError):  # (a stream that is no text file)
                stream.reconfigure(errors="backslashreplace")
    try:
        parser = build_parser()  # (no torch: a command's module imports it when the command runs)
    except KeyboardInterrupt:
        return _interrupted()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        import torch  # (a second or more)
    except KeyboardInterrupt:
        return _interrupted()
    threads = torch.get_num_threads()  # (a command may pick fewer for itself: a caller's process keeps its own)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return _interrupted()
    except BrokenPipeError:  # the reader went away (`lorakit ... | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the flush at exit does not fail again
        return 1
    except (ValueError, TypeError, KeyError, OSError) as exc:
        # User-facing errors carry a message that names the bad value; no deep traceback. OSError:
        # a path that cannot be read or written (a file where a directory is needed, no
        # permission, a full disk): the system's message names the path.
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        if isinstance(exc, OSError) and exc.strerror and exc.filename:  # not "[Errno 20] ...": what and where
            msg = f"{exc.strerror}: {str(exc.filename)!r}" + (f" -> {str(exc.filename2)!r}" if exc.filename2 else "")
        from lorakit.train.cli import process_tag

        print(f"{process_tag()}lorakit {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        # a torchrun process whose partner died mid-collective gets gloo's RuntimeError ("Connection
        # closed by peer", ...): one line that points at the other process's own error
        if not _lost_peer(exc):
            raise
        from lorakit.train.cli import process_tag

        print(f"{process_tag()}lorakit {args.command}: error: another process of this run stopped (the connection "
              "to it was lost); its own error, if it had one, is printed above", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)


def _interrupted() -> int:
    """Ctrl-C: one word on stderr, no traceback, the shell's exit code for SIGINT."""
    print("\ninterrupted", file=sys.stderr)
    return 130


def _lost_peer(exc: RuntimeError) -> bool:
    """Whether ``exc`` is torch.distributed's report of a process of this run that went away."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) < 2:
        return False
    text = str(exc).lower()
    return any(s in text for s in ("connection closed by peer", "connection reset by peer", "broken pipe",
                                   "connection refused", "socket closed"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
