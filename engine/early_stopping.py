"""Early stopping on validation loss, and which checkpoint is the best one.

State lives in the trainer state of every checkpoint (`state_dict`), so a resumed run continues the count
where the checkpoint left it instead of starting a fresh patience window.

Two notions are tracked separately, as Keras does:
- `best` / `best_step`: the lowest val_loss seen (any improvement) - the checkpoint `checkpoint.keep_best` keeps;
- `reference` / `bad_evals`: the val_loss of the last improvement by more than `min_delta`, and how many evals
  since then did not beat it by more than `min_delta`. `patience` such evals in a row stop the run.
"""

from __future__ import annotations

import math

from engine.checkpoint import checkpoint_name
from engine.config import EarlyStoppingConfig


class EarlyStopping:
    def __init__(self, cfg: EarlyStoppingConfig):
        self.patience = cfg.patience
        self.min_delta = cfg.min_delta
        self.best = math.inf
        self.best_step: int | None = None
        self.reference = math.inf
        self.bad_evals = 0
        self.stopped_at: int | None = None

    def update(self, step: int, val_loss: float, count: bool = True) -> bool:
        """Record one eval; True if it is a new best (lowest so far). `count=False` (the eval at the end of the run)
        only updates the best: patience is about the periodic evals."""
        improved = val_loss < self.best
        if improved:
            self.best, self.best_step = val_loss, step
        if not count:
            return improved
        if val_loss < self.reference - self.min_delta:
            self.reference, self.bad_evals = val_loss, 0
        else:
            self.bad_evals += 1
        if self.patience and self.bad_evals >= self.patience and self.stopped_at is None:
            self.stopped_at = step
        return improved

    @property
    def should_stop(self) -> bool:
        return self.stopped_at is not None

    def message(self) -> str:
        return (f"early stopping at step {self.stopped_at}: val_loss did not improve by more than {self.min_delta:g} "
                f"for {self.bad_evals} evals (best {self.best:.4f} at step {self.best_step})")

    def best_checkpoint_name(self) -> str | None:
        return None if self.best_step is None else checkpoint_name(self.best_step)

    def state_dict(self) -> dict:
        # JSON has no infinity: None stands for "no eval yet".
        fin = lambda x: None if math.isinf(x) else x  # noqa: E731
        return {"best": fin(self.best), "best_step": self.best_step, "reference": fin(self.reference),
                "bad_evals": self.bad_evals, "stopped_at": self.stopped_at}

    def load_state_dict(self, st: dict | None) -> None:
        if not st:
            return
        inf = lambda x: math.inf if x is None else float(x)  # noqa: E731
        self.best, self.best_step = inf(st.get("best")), st.get("best_step")
        self.reference, self.bad_evals = inf(st.get("reference")), int(st.get("bad_evals", 0))
        self.stopped_at = st.get("stopped_at")
