"""`engine sweep`: hyperparameter search (engine/sweep.py) over a YAML search space, on top of a run config (presets,
YAML files, dotted overrides) as `engine train` takes it."""

from __future__ import annotations

from pathlib import Path

from engine.commands.train import config_from_args
from engine.errors import ConfigError
from engine.sweep import check_space, load_space, run_sweep

NAME = "sweep"
HELP = ("hyperparameter search with optuna over a YAML search space: each trial a normal run, pruned on validation "
        "loss at the periodic evals; a table of the trials and the best config")


def add_arguments(p) -> None:
    p.add_argument("space", metavar="SPACE.yaml", help="the search space: `space:` dotted keys -> {low, high, log, step} "
                   "or {choices}; optional trials, sampler (tpe|random|grid), seed, pruning (see engine/sweep.py)")
    p.add_argument("--config", "-c", action="append", default=None, metavar="FILE|PRESET",
                   help="the base run config (YAML or preset; repeat to layer). Default: the 'cpu_default' preset.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the base config")
    p.add_argument("--output", "-o", metavar="DIR", default=None,
                   help="the sweep folder: study.db, trial-NNN run folders, best.yaml (default: sweeps/<SPACE name>); "
                        "running the same command again continues the study there")
    p.add_argument("--trials", type=int, default=None, metavar="N", help="trials the study holds in all (overrides "
                   "the space file's `trials`)")


def run(args) -> int:
    space = load_space(args.space)
    if args.trials is not None:
        if args.trials < 1:
            raise ConfigError("--trials must be at least 1")
        space = space.model_copy(update={"trials": args.trials})
    base = config_from_args(args)
    check_space(space, base, args.space)
    folder = Path(args.output or Path("sweeps") / Path(args.space).stem)
    run_sweep(base, space, folder)
    return 0
