"""`engine` command line: one table of subcommands; user errors print one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from engine.errors import EngineError

PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"


def preset_dir() -> Path:
    """configs/ of a source checkout, or the copy packaged as engine.presets in a wheel."""
    if PRESETS_DIR.is_dir():
        return PRESETS_DIR
    from importlib.resources import files

    return Path(str(files("engine.presets")))


DEFAULT_PRESET = "cpu_default"


def resolve_config_path(name: str) -> str:
    """A path, or the name of a shipped preset (`gpt2-xl_full_t4`)."""
    p = Path(name)
    if p.exists() or p.suffix in (".yaml", ".yml") or os.sep in name:
        return name
    candidate = preset_dir() / f"{name}.yaml"
    if candidate.exists():
        return str(candidate)
    known = ", ".join(sorted(x.stem for x in preset_dir().glob("*.yaml")))
    raise EngineError(f"--config {name}: no such file or preset (presets: {known})")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "DS_ACCELERATOR" not in os.environ and not _has_cuda():
        os.environ["DS_ACCELERATOR"] = "cpu"  # skips DeepSpeed's accelerator probe and its warning
    import logging
    import warnings

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # Deprecation notices of the libraries' own internals (e.g. peft calling a renamed transformers method) are not
    # the user's to act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|torch)(\.|$)")
    if "transformers" in sys.modules:  # imported before the environment above was set (main() called in-process)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


# ----------------------------------------------------------------------------- train


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", action="append", default=None, metavar="FILE|PRESET",
                   help=f"YAML config or preset name; repeat to layer (later wins). Default: the '{DEFAULT_PRESET}' preset.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=3e-5 memory.zero_stage=2")


def load_cli_config(args):
    from engine.config import load_config

    paths = [resolve_config_path(c) for c in (args.config or [DEFAULT_PRESET])]
    return load_config(paths, args.overrides)


def cmd_train(args) -> int:
    if args.help_config:
        from engine.config import describe_schema

        for key, default, desc in describe_schema():
            print(f"{key:40s} {default:24s} {desc}")
        return 0
    if args.resume:
        args.overrides = [*args.overrides, f"checkpoint.resume={'true' if args.resume == 'latest' else args.resume}"]
    if args.no_preflight:
        args.overrides = [*args.overrides, "train.preflight=false"]
    cfg = load_cli_config(args)
    from engine.distributed import export_slurm_env
    from engine.train import run_training

    export_slurm_env()  # `srun engine train`: DeepSpeed's process group reads the torch variables
    run_training(cfg, dry_run=args.dry_run)
    return 0


def cmd_presets(args) -> int:
    from engine.config import read_yaml

    for p in sorted(preset_dir().glob("*.yaml")):
        first = p.read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip()
        read_yaml(p)
        print(f"{p.stem:28s} {first}")
    return 0


def cmd_report(args) -> int:
    from engine.report import run_report_cli

    return run_report_cli(args)


def cmd_plan(args) -> int:
    from engine.plan import run_plan_cli

    return run_plan_cli(args)


def cmd_generate(args) -> int:
    from engine.generate import run_generate_cli

    return run_generate_cli(args)


def cmd_eval(args) -> int:
    from engine.evaluate import run_eval_cli

    return run_eval_cli(args)


def cmd_classify(args) -> int:
    from engine.classify import run_classify_cli

    return run_classify_cli(args)


COMMANDS = {
    "train": (cmd_train, "fine-tune a GPT-2 model (one process, or under deepspeed/torchrun)"),
    "plan": (cmd_plan, "will it fit? predict GPU memory, host RAM and step time of every configuration, "
                       "recommend the fastest that fits and write it as a config"),
    "report": (cmd_report, "plot runs from their metrics.jsonl (loss, lr, tokens/s, peak memory); several runs overlaid"),
    "generate": (cmd_generate, "write text with a trained model (full model, ZeRO export or LoRA adapter): greedy or "
                               "sampling, stop strings, several sequences; text or JSONL"),
    "eval": (cmd_eval, "loss and perplexity (classifiers: accuracy and F1) of one or more trained models on a test "
                       "file, as a comparison table"),
    "classify": (cmd_classify, "label texts with a trained classifier (task: classification)"),
    "presets": (cmd_presets, "list the shipped config presets"),
}


# Subcommands that use a trained model; their arguments are defined next to their code.
USE_ARGS = {"generate": ("engine.generate", "add_generate_args"), "eval": ("engine.evaluate", "add_eval_args"),
            "classify": ("engine.classify", "add_classify_args")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engine",
        description="Memory-optimized fine-tuning of GPT-2 (up to gpt2-xl): ZeRO, offload, checkpointing, 8-bit Adam, LoRA.",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(fn=fn)
        p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        if name == "train":
            _add_config_args(p)
            p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                           help="continue from the newest complete checkpoint in logging.output_dir (or the one given)")
            p.add_argument("--dry-run", action="store_true", help="validate config and data, print the plan, build no model")
            p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
            p.add_argument("--no-preflight", action="store_true",
                           help="skip the pre-flight memory prediction that stops a run predicted not to fit")
        if name == "plan":
            from engine.plan import add_plan_args

            add_plan_args(p)
        if name == "report":
            from engine.report import add_report_args

            add_report_args(p)
        if name in USE_ARGS:
            module, fn = USE_ARGS[name]
            getattr(importlib.import_module(module), fn)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    _quiet_libraries()
    try:
        return args.fn(args)
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
