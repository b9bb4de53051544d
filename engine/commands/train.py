"""`engine train`: a config (presets, YAML files, dotted overrides) -> the training recipe (engine/train.py)."""

from __future__ import annotations

from engine.config import (
    DEFAULT_PRESET,
    describe_schema,
    load_config,
    resolve_config_path,
)
from engine.distributed import export_slurm_env
from engine.train import dry_run, run_training

NAME = "train"
HELP = "fine-tune a GPT-2 model (one process, or under deepspeed/torchrun)"


def add_config_args(p) -> None:
    p.add_argument("--config", "-c", action="append", default=None, metavar="FILE|PRESET",
                   help=f"YAML config or preset name; repeat to layer (later wins). Default: the '{DEFAULT_PRESET}' preset.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. optim.lr=3e-5 memory.zero_stage=2 (before or after the options)")


def add_arguments(p) -> None:
    add_config_args(p)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the newest complete checkpoint in logging.output_dir (or the one given)")
    p.add_argument("--dry-run", action="store_true", help="validate config and data, print the plan, build no model")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("--no-preflight", action="store_true",
                   help="skip the pre-flight memory prediction that stops a run predicted not to fit")


def config_from_args(args):
    paths = [resolve_config_path(c) for c in (args.config or [DEFAULT_PRESET])]
    return load_config(paths, args.overrides)


def run(args) -> int:
    if args.help_config:
        for key, default, desc in describe_schema():
            print(f"{key:40s} {default:24s} {desc}")
        return 0
    if args.resume and "=" in args.resume:
        # `--resume logging.output_dir=out`: argparse gave the option the next token, but a key=value token is an
        # override, never a checkpoint path.
        args.overrides, args.resume = [*args.overrides, args.resume], "latest"
    if args.resume:
        args.overrides = [*args.overrides, f"checkpoint.resume={'true' if args.resume == 'latest' else args.resume}"]
    if args.no_preflight:
        args.overrides = [*args.overrides, "train.preflight=false"]
    cfg = config_from_args(args)
    export_slurm_env()  # `srun engine train`: DeepSpeed's process group reads the torch variables
    if args.dry_run:
        dry_run(cfg)
    else:
        run_training(cfg)
    return 0
