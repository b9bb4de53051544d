"""How a run continues from a checkpoint: one decision, made before any model loads, and carried out in one call.

A checkpoint records the run layout it was written with (`run_layout`, in its trainer state). Against the layout
of the run that resumes it, `plan_resume` decides:
- exact: nothing that shapes the state changed; the backend loads its own files (`Backend.load`);
- convert: the backend, world size, ZeRO stage or in-backward setting changed; the checkpoint's layout class reads
  it into a `PortableState` and the new backend's layout writes its own form (masters and moments bit for bit);
- weights: another optimizer (checkpoint.allow_layout_change), or an optimizer state that cannot move between the two
  layouts (allowed the same way): weights and schedule, with a fresh optimizer state;
- refused: one line saying what differs and what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from engine.backends import layout_of
from engine.backends.base import Backend, CheckpointLayout
from engine.checkpoint import read_trainer_state
from engine.config import RunConfig
from engine.errors import EngineError
from engine.portable import NotPortable
from engine.tokenizer import tokenizer_fingerprint

# May differ on resume with checkpoint.allow_layout_change; the rest decides what the saved state means.
SOFT_LAYOUT = ("global_batch", "seed", "block_size", "optimizer")
# May differ on any resume: the checkpoint is converted, masters and moments bit for bit, and with the same global
# batch every step sees the same samples.
PORTABLE_LAYOUT = ("backend", "world_size", "zero_stage", "optimizer_in_backward")
ALLOW_HINT = "checkpoint.allow_layout_change=true continues from its weights with a fresh optimizer state"


def run_layout(cfg: RunConfig, world_size: int, global_batch: int, tokenizer) -> dict:
    """What a checkpoint's state depends on (saved with it; a resume must match it or convert it)."""
    m = cfg.model
    return {
        "model": m.name, "init": m.init, "family": m.family, **m.overrides(),
        "vocab_size": len(tokenizer), "tokenizer": tokenizer_fingerprint(tokenizer), "seed": cfg.train.seed,
        "block_size": cfg.data.block_size, "backend": cfg.backend_for(world_size), "world_size": world_size,
        "global_batch": global_batch, "optimizer": cfg.optim.name,
        "optimizer_in_backward": cfg.memory.optimizer_in_backward, "zero_stage": cfg.memory.zero_stage,
        "precision": cfg.memory.precision, "master_weights": cfg.memory.master_weights,
        "lora": cfg.memory.lora.model_dump() if cfg.memory.lora.enabled else None,
        "freeze": cfg.memory.freeze.model_dump(),
        "streaming": cfg.data.streaming,  # a stream's checkpoint holds its position, a shuffled split's does not
    }


def checkpoint_layout(ckpt: Path) -> CheckpointLayout:
    """The layout class that wrote `ckpt` (from the run layout in its trainer state)."""
    saved = read_trainer_state(ckpt).get("layout")
    if not saved:
        raise EngineError(f"{ckpt}: its trainer state records no run layout (written by an older engine)")
    return layout_of(saved)


@dataclass(frozen=True)
class ResumePlan:
    """How to continue from `checkpoint`: `how` is exact | convert | weights; `notes` are the lines to show."""

    checkpoint: Path
    how: Literal["exact", "convert", "weights"]
    source: CheckpointLayout
    allow_change: bool
    notes: tuple[str, ...] = field(default=())

    def carry_out(self, backend: Backend) -> str:
        """Load the checkpoint into `backend` as planned; returns what was done, for the log. A state found
        unreadable only now (a checkpoint older than the names it needs) takes the weights-only path when allowed."""
        if self.how == "exact":
            backend.load(self.checkpoint)
            return f"loaded {self.checkpoint} as written ({self.source.name})"
        try:
            ps = self.source.to_portable(self.checkpoint, with_states=self.how == "convert")
        except NotPortable as e:
            if not self.allow_change:
                raise EngineError(f"cannot resume {self.checkpoint} on this layout: {e} ({ALLOW_HINT})") from None
            ps = self.source.to_portable(self.checkpoint, with_states=False)
        backend.load_portable(ps)
        return (f"converted {self.checkpoint} from {ps.source} ({len(ps.weights)} weights, "
                f"{'optimizer state for ' + str(len(ps.states)) if ps.states else 'a fresh optimizer state'})")


def plan_resume(ckpt: Path, layout: dict, allow_change: bool) -> ResumePlan:
    """The one resume decision (module docstring); raises EngineError, one line, when the checkpoint cannot resume
    this run."""
    saved = read_trainer_state(ckpt).get("layout", {})
    diffs = {k: f"{k}={saved[k]!r} there, {v!r} now" for k, v in layout.items() if k in saved and saved[k] != v}
    hard = [d for k, d in diffs.items() if k not in PORTABLE_LAYOUT and not (allow_change and k in SOFT_LAYOUT)]
    if hard:
        hint = "" if allow_change or set(diffs) - set(SOFT_LAYOUT) - set(PORTABLE_LAYOUT) else \
            " (checkpoint.allow_layout_change=true resumes anyway, as a new data order)"
        raise EngineError(f"cannot resume {ckpt}: it was saved with a different setup ({'; '.join(hard)}){hint}")
    source = layout_of(saved) if saved else layout_of(layout)
    notes = []
    inexact = [d for k, d in diffs.items() if k not in PORTABLE_LAYOUT]
    if inexact:
        what = " (the optimizer starts from a fresh state)" if "optimizer" in diffs else ""
        notes.append(f"warning: resuming {ckpt} with a changed setup ({'; '.join(inexact)}): not an exact "
                     f"continuation{what}")
    moved = [d for k, d in diffs.items() if k in PORTABLE_LAYOUT]
    if not moved and "optimizer" not in diffs:
        return ResumePlan(ckpt, "exact", source, allow_change, tuple(notes))
    if "optimizer" in diffs:
        return ResumePlan(ckpt, "weights", source, allow_change, tuple(notes))
    problem = source.states_problem() or layout_of(layout).states_problem()
    if problem is None:
        notes.append(f"resuming {ckpt} on another layout ({'; '.join(moved)}): its weights and optimizer state are "
                     "converted")
        return ResumePlan(ckpt, "convert", source, allow_change, tuple(notes))
    if not allow_change:
        raise EngineError(f"cannot resume {ckpt} on this layout ({'; '.join(moved)}): {problem} ({ALLOW_HINT})")
    notes.append(f"warning: resuming {ckpt} on another layout ({'; '.join(moved)}): {problem}: the optimizer starts "
                 "from a fresh state")
    return ResumePlan(ckpt, "weights", source, allow_change, tuple(notes))
