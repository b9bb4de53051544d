"""`engine` command line: a list of subcommands (engine/commands/); user errors print one line and exit 2.

Options and `key=value` overrides may come in any order (`engine train a=1 --resume CKPT b=2`). What the libraries
log for themselves (deprecations, optional kernels they could not load) goes to a log file, not the console: the
console carries what the user can act on.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

from engine.commands import COMMANDS, add_parser
from engine.errors import EngineError
from engine.notices import library_log_path, library_notices_to_file

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
        description="Memory-optimized fine-tuning of GPT-2 (up to gpt2-xl) and Llama, Qwen2, GPT-NeoX models of that size: "
                    "ZeRO, offload, checkpointing, 8-bit Adam, LoRA.",
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
