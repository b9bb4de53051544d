"""`engine sweep`: hyperparameter search over a YAML search space with optuna.

Each trial is a normal run (`run_training`) in its own run folder (`<sweep dir>/trial-NNN`), scored by its final
validation loss. Pruning acts through the engine's periodic eval: every `eval.every_n_steps` the trial reports its
validation loss to optuna's median pruner, which may end it there (`RunPruned`). The study lives in
`<sweep dir>/study.db` (SQLite), so an interrupted sweep continues where it stopped: a trial that was running when
the sweep died is run again first. Trials run one after another; under a launcher every rank runs each trial
(rank 0 asks optuna and broadcasts the parameters; the pruning decision is made collectively by the recipe).
At the end: a table of the trials and `<sweep dir>/best.yaml`, the best trial's config for `engine train --config`.

The search space file:

    trials: 12                  # how many trials the study should hold (finished or pruned) in all
    sampler: tpe                # tpe | random | grid (grid: every combination of `choices`)
    seed: 0
    pruning: {startup_trials: 1, warmup_evals: 0}   # or pruning: false
    space:
      optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
      schedule.warmup_steps: {low: 0, high: 50}      # two ints: an integer
      optim.weight_decay: {low: 0.0, high: 0.1}
      memory.lora.r: {choices: [4, 8, 16]}
      train.micro_batch_size: {choices: [4, 8]}
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Literal

import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.backends.deepspeed_backend import init_distributed
from engine.config import RunConfig, config_to_yaml, read_yaml, validate_dict
from engine.distributed import DistEnv, dist_env
from engine.errors import ConfigError, EngineError
from engine.notices import drop_late_console_handler
from engine.run_dir import CONFIG
from engine.train import RunPruned, TrainingRecipe, run_training, say

STUDY = "study.db"
BEST = "best.yaml"
Value = bool | int | float | str


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(Strict):
    low: float | int | None = Field(None, description="Lowest value (with high).")
    high: float | int | None = Field(None, description="Highest value (with low).")
    log: bool = Field(False, description="Sample on a log scale (low > 0).")
    step: float | int | None = Field(None, gt=0, description="Only multiples of step above low.")
    choices: list[Value] | None = Field(None, description="Pick one of these values.")

    @model_validator(mode="after")
    def _one_kind(self) -> "Distribution":
        ranged = self.low is not None or self.high is not None
        if self.choices is not None:
            if ranged or self.log or self.step is not None:
                raise ValueError("give either choices or low/high (with log, step), not both")
            if not self.choices:
                raise ValueError("choices is empty")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high (or choices)")
        if not self.low < self.high:
            raise ValueError(f"low={self.low} must be below high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log=true needs low > 0 (low={self.low})")
        if self.log and self.step is not None:
            raise ValueError("log=true and step cannot be combined")
        return self

    @property
    def is_int(self) -> bool:
        return all(isinstance(v, int) for v in (self.low, self.high, self.step) if v is not None)

    def extremes(self) -> list[Value]:
        return list(self.choices) if self.choices is not None else [self.low, self.high]


class Pruning(Strict):
    startup_trials: int = Field(1, ge=0, description="Trials that run to the end before any is pruned.")
    warmup_evals: int = Field(0, ge=0, description="Periodic evals of a trial before it may be pruned.")


class SweepSpace(Strict):
    space: dict[str, Distribution] = Field(description="Dotted config key -> its distribution.")
    trials: int = Field(10, gt=0, description="Trials the study holds in all (finished or pruned).")
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    seed: int = 0
    pruning: Pruning | Literal[False] = Field(default_factory=Pruning)

    @model_validator(mode="after")
    def _grid(self) -> "SweepSpace":
        if not self.space:
            raise ValueError("space is empty: give at least one key, e.g. optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}")
        if self.sampler == "grid" and any(d.choices is None for d in self.space.values()):
            raise ValueError("sampler: grid needs choices for every key")
        return self


def load_space(path: str) -> SweepSpace:
    """The search space file, validated: any problem is one line naming the key."""
    try:
        return SweepSpace.model_validate(read_yaml(path))
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"] if not str(x).startswith(("function-", "literal[")))
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"sweep space {path}: {key + ': ' if key else ''}{msg}") from None


def check_space(space: SweepSpace, base: RunConfig, path: str) -> None:
    """Every key is a config key, and each extreme value (or choice) makes a valid config with the base."""
    for key, d in space.space.items():
        for value in d.extremes():
            try:
                base.updated({key: value})
            except ConfigError as e:
                raise ConfigError(f"sweep space {path}: {key}={value!r} does not make a valid run config: "
                                  f"{str(e).removeprefix('invalid config: ')}") from None


def suggest(trial, space: SweepSpace) -> dict[str, Value]:
    out = {}
    for key, d in space.space.items():
        if d.choices is not None:
            out[key] = trial.suggest_categorical(key, d.choices)
        elif d.is_int:
            out[key] = trial.suggest_int(key, int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
        else:
            out[key] = trial.suggest_float(key, float(d.low), float(d.high), step=d.step, log=d.log)
    return out


def open_study(folder: Path, space: SweepSpace):
    """The sweep's optuna study in folder/study.db; trials left running by an interrupted sweep are failed and
    queued again, so they run first."""
    import optuna

    drop_late_console_handler("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if space.sampler in ("random", "grid"):  # grid: the points are queued (`queue_grid_point`), the rest is random
        sampler = optuna.samplers.RandomSampler(seed=space.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=space.seed)
    pruner = (optuna.pruners.NopPruner() if space.pruning is False else
              optuna.pruners.MedianPruner(n_startup_trials=space.pruning.startup_trials,
                                          n_warmup_steps=space.pruning.warmup_evals))
    folder.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=f"sqlite:///{folder / STUDY}", study_name="sweep", direction="minimize",
                                sampler=sampler, pruner=pruner, load_if_exists=True)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params)
    return study


def grid_points(space: SweepSpace) -> list[dict]:
    """Every combination of the choices, in an order shuffled by the space's seed."""
    keys = list(space.space)
    points = [dict(zip(keys, values)) for values in itertools.product(*(space.space[k].choices for k in keys))]
    random.Random(space.seed).shuffle(points)
    return points


def queue_grid_point(study, space: SweepSpace) -> None:
    """sampler: grid: the next combination no trial has finished (or is queued) is queued for the next ask.
    (optuna's GridSampler stops the study from inside `tell`, which only works under `study.optimize`.)"""
    seen = [t.params for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED", "WAITING")]
    todo = [p for p in grid_points(space) if p not in seen]
    if todo and not any(t.state.name == "WAITING" for t in study.get_trials(deepcopy=False)):
        study.enqueue_trial(todo[0])


def trials_left(study, space: SweepSpace) -> int:
    import optuna

    done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)))
    total = math.prod(len(d.choices) for d in space.space.values()) if space.sampler == "grid" else space.trials
    return max(0, min(space.trials, total) - done)


def trial_config(base: RunConfig, params: dict, folder: Path, number: int) -> RunConfig:
    return base.updated({**params, "logging.output_dir": str(folder / f"trial-{number:03d}"), "logging.overwrite": True})


def check_data(base: RunConfig, env: DistEnv) -> None:
    """The data once, before any trial: a bad file costs seconds, and trials need a validation split to be scored."""
    recipe = TrainingRecipe(base, env)
    recipe.setup_data()
    if "validation" not in recipe.splits:
        raise ConfigError("engine sweep scores each trial by its validation loss, but the run has no validation split: "
                          "set data.validation_file, data.validation_split (or, with data.dataset, its split name)")
    if not (base.eval.at_end and base.eval.every_n_steps):
        say(env, "note: pruning needs periodic evals (eval.every_n_steps > 0) and scoring eval.at_end=true")


def broadcast(obj, env: DistEnv):
    """Rank 0's object on every rank (the trial's number and parameters)."""
    if env.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_trial(cfg: RunConfig, trial, env: DistEnv) -> tuple[str, float | None]:
    """One trial's run: ("complete", val_loss), ("pruned", last reported val_loss) or ("failed", None)."""
    reported: dict[str, float] = {}

    def on_eval(step: int, ev: dict) -> bool:
        reported["val_loss"] = ev["val_loss"]
        if trial is None:  # ranks > 0: rank 0 decides, the recipe makes it collective
            return False
        trial.report(ev["val_loss"], step)
        return trial.should_prune()

    try:
        summary = run_training(cfg, on_eval=on_eval)
    except RunPruned:
        return "pruned", reported.get("val_loss")
    except EngineError as e:  # e.g. a learning rate that diverges: the sweep goes on
        say(env, f"trial failed: {e}")
        return "failed", None
    if summary.get("preempted"):  # Ctrl-C / SIGTERM: the sweep stops; the trial stays running, to be run again
        return "interrupted", None
    return "complete", summary.get("val_loss")


def run_sweep(base: RunConfig, space: SweepSpace, folder: Path) -> None:
    """Run the trials the study still needs, one after another (every rank runs each), then report."""
    env = dist_env()
    if env.world_size > 1:
        init_distributed(env)
    check_data(trial_config(base, {}, folder, 0), env)
    study = open_study(folder, space) if env.is_main else None
    n = broadcast(trials_left(study, space) if env.is_main else None, env)
    say(env, f"sweep: {n} trial(s) to run in {folder} (study {folder / STUDY})")
    for _ in range(n):
        if env.is_main and space.sampler == "grid":
            queue_grid_point(study, space)
        trial = study.ask() if env.is_main else None
        number, params = broadcast((trial.number, suggest(trial, space)) if env.is_main else None, env)
        say(env, f"\ntrial {number}: " + " ".join(f"{k}={v}" for k, v in params.items()))
        state, value = run_trial(trial_config(base, params, folder, number), trial, env)
        if state == "interrupted":
            say(env, f"sweep interrupted during trial {number}: the same command continues it (the trial runs again)")
            return
        if env.is_main:
            tell(study, trial, state, value)
        say(env, f"trial {number}: {state}" + (f", val_loss {value:.4f}" if value is not None else ""))
    if env.is_main:
        print("\n" + trials_table(study, space, folder), flush=True)
        best = write_best(study, folder)
        if best is not None:
            print(f"best config: {best} (engine train --config {best})", flush=True)


def tell(study, trial, state: str, value: float | None) -> None:
    import optuna

    if state == "complete" and value is not None and math.isfinite(value):
        study.tell(trial, value)
    elif state == "pruned":
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)


def trials_table(study, space: SweepSpace, folder: Path) -> str:
    """One line per trial: number, state, parameters, validation loss (final, or the last reported when pruned),
    the last eval step, the run folder."""
    keys = list(space.space)
    head = ["trial", "state", *keys, "val_loss", "at step", "run folder"]
    rows = []
    best = study.best_trial.number if any(t.state.name == "COMPLETE" for t in study.trials) else None
    for t in study.trials:
        last = max(t.intermediate_values) if t.intermediate_values else None
        value = t.value if t.value is not None else (t.intermediate_values[last] if last is not None else None)
        rows.append([f"{t.number}{'*' if t.number == best else ''}", t.state.name.lower(),
                     *[_fmt(t.params.get(k)) for k in keys], "-" if value is None else f"{value:.4f}",
                     "end" if t.state.name == "COMPLETE" else ("-" if last is None else str(last)),
                     str(folder / f"trial-{t.number:03d}")])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r: list[str]) -> str:  # numbers right-aligned; trial, state and folder left
        return "  ".join(c.ljust(w) if i in (0, 1, len(head) - 1) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    lines = [line(r).rstrip() for r in [head, *rows]]
    return "\n".join([lines[0], "-" * max(map(len, lines)), *lines[1:], "* best"])


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def write_best(study, folder: Path) -> Path | None:
    """The best trial's config (as it ran, resolved) as folder/best.yaml, writing into folder/best."""
    if not any(t.state.name == "COMPLETE" for t in study.trials):
        return None
    number = study.best_trial.number
    ran = validate_dict(read_yaml(folder / f"trial-{number:03d}" / CONFIG))
    best = ran.updated({"logging.output_dir": str(folder / "best"), "logging.overwrite": False})
    path = folder / BEST
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in study.best_trial.params.items())
    path.write_text(f"# engine sweep: trial {number} of {folder}, val_loss {study.best_value:.4f} ({params})\n"
                    + config_to_yaml(best))
    return path
