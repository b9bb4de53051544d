"""`engine` command line: a list of subcommands (engine/commands/); user errors print one line and exit 2.

Options and `key=value` overrides may come in any order (`engine train a=1 --resume CKPT b=2`). What the libraries
log for themselves (deprecations, optional kernels they could not load) goes to a log file, not the console: the
console carries what the user can act on.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

import torch

from engine.commands import COMMANDS, add_parser
from engine.devices import return_freed_host_memory
from engine.errors import EngineError

LIBRARY_LOGGERS = ("bitsandbytes", "deepspeed", "DeepSpeed", "transformers", "peft", "datasets", "torch", "accelerate",
                   "py.warnings")


def library_log_path() -> Path:
    """Where the libraries' own notices go: $ENGINE_LOG, else engine.log in the engine's cache folder."""
    if os.environ.get("ENGINE_LOG"):
        return Path(os.environ["ENGINE_LOG"])
    return Path(os.environ.get("ENGINE_CACHE", Path.home() / ".cache" / "gpt2-memengine")) / "engine.log"


@contextlib.contextmanager
def library_notices_to_file(path: Path):
    """Route the libraries' logging (and Python warnings) to `path` for the duration; restore everything after."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(path, mode="a", encoding="utf-8", delay=True)
    except OSError:
        handler = logging.NullHandler()  # no writable log folder: the notices are dropped, never printed
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    saved = [(name, logging.getLogger(name).handlers[:], logging.getLogger(name).propagate) for name in LIBRARY_LOGGERS]
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        for h in lg.handlers[:]:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)  # the library's own console handler (DeepSpeed installs one)
        lg.addHandler(handler)
        lg.propagate = False
    logging.captureWarnings(True)
    try:
        yield path
    finally:
        logging.captureWarnings(False)
        for name, handlers, propagate in saved:
            lg = logging.getLogger(name)
            lg.handlers[:] = handlers
            lg.propagate = propagate
        handler.close()


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "DS_ACCELERATOR" not in os.environ and not _has_cuda():
        os.environ["DS_ACCELERATOR"] = "cpu"  # skips DeepSpeed's accelerator probe and its warning
    # Deprecation notices of the libraries' own internals (e.g. peft calling a renamed transformers method) are not
    # the user's to act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|torch)(\.|$)")
    if "transformers" in sys.modules:  # imported before the environment above was set (main() called in-process)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _has_cuda() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:
        return False


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(
        prog="engine",
        description="Memory-optimized fine-tuning of GPT-2 (up to gpt2-xl): ZeRO, offload, checkpointing, 8-bit Adam, LoRA.",
        epilog=f"The libraries' own log notices go to {library_log_path()} (set ENGINE_LOG to change it).",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        add_parser(sub, command)
    return parser, sub


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Top-level options, then the command's arguments parsed intermixed: positionals (overrides, model folders)
    may come before and after its options."""
    parser, sub = build_parser()
    i = next((k for k, a in enumerate(argv) if a in sub.choices), None)
    if i is None:
        return parser.parse_args(argv)  # no command: --help, or argparse's own message
    args = sub.choices[argv[i]].parse_intermixed_args(argv[i + 1:], namespace=parser.parse_args(argv[:i]))
    args.command = argv[i]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    if not getattr(args, "command", None):
        build_parser()[0].print_help()
        return 0
    _quiet_libraries()
    return_freed_host_memory()
    try:
        with library_notices_to_file(library_log_path()):
            return args.run(args)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `engine train --help-config | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
