"""The run folder (`logging.output_dir`): never overwritten by accident, cleared on request, rewound on resume,
and the layout a checkpoint's state depends on (a resume must match it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from engine.config import RunConfig
from engine.errors import EngineError
from engine.tokenizer import tokenizer_fingerprint

RUN_MARKER = "run.json"
METRICS = "metrics.jsonl"
# May differ on resume with checkpoint.allow_layout_change; the rest decides what the saved state means.
SOFT_LAYOUT = ("global_batch", "seed", "block_size", "optimizer")
# May differ on any resume: the checkpoint is converted (engine.portable), masters and moments bit for bit, and with
# the same global batch every step sees the same samples.
PORTABLE_LAYOUT = ("world_size", "zero_stage", "optimizer_in_backward")

def check_output_dir(cfg: RunConfig, resuming: bool) -> Path:
    """Never silently overwrite another run's results."""
    out = Path(cfg.logging.output_dir)
    if out.exists() and not out.is_dir():
        raise EngineError(f"logging.output_dir {out} exists and is not a folder")
    if (out / RUN_MARKER).exists() and not resuming and not cfg.logging.overwrite:
        raise EngineError(
            f"{out} already holds a run: pass checkpoint.resume=true to continue it, logging.overwrite=true to replace "
            "it, or choose another logging.output_dir"
        )
    return out


def clear_run(out: Path) -> None:
    """logging.overwrite: remove the previous run's results so nothing of it is mixed into this one."""
    for name in ("checkpoints", "model", "adapter", "tensorboard", "plots"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (METRICS, "summary.json", RUN_MARKER):
        (out / name).unlink(missing_ok=True)


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
    path.write_text("".join(l + "\n" for l in keep))


def run_layout(cfg: RunConfig, world_size: int, global_batch: int, tokenizer) -> dict:
    """What a checkpoint's state depends on; a resume must match it."""
    m = cfg.model
    return {
        "model": m.name, "init": m.init, "n_layer": m.n_layer, "n_embd": m.n_embd, "n_head": m.n_head,
        "vocab_size": len(tokenizer), "tokenizer": tokenizer_fingerprint(tokenizer), "seed": cfg.train.seed,
        "block_size": cfg.data.block_size, "world_size": world_size, "global_batch": global_batch,
        "optimizer": cfg.optim.name, "optimizer_in_backward": cfg.memory.optimizer_in_backward,
        "zero_stage": cfg.memory.zero_stage, "precision": cfg.memory.precision,
        "master_weights": cfg.memory.master_weights,
        "lora": cfg.memory.lora.model_dump() if cfg.memory.lora.enabled else None,
        "freeze": cfg.memory.freeze.model_dump(),
        "streaming": cfg.data.streaming,  # a stream's checkpoint holds its position, a shuffled split's does not
    }


def check_layout(ckpt: Path, layout: dict, allow_change: bool, warn) -> set[str]:
    """Whether `ckpt` can resume with `layout`; returns the layout keys that differ (the caller converts the state
    when any of them is set)."""
    try:
        saved = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8")).get("layout", {})
    except (OSError, ValueError) as e:
        raise EngineError(f"cannot resume {ckpt}: its trainer_state.json is unreadable ({e})") from None
    diffs = {k: f"{k}={saved[k]!r} there, {v!r} now" for k, v in layout.items() if k in saved and saved[k] != v}
    hard = [d for k, d in diffs.items() if k not in PORTABLE_LAYOUT and not (allow_change and k in SOFT_LAYOUT)]
    if hard:
        hint = "" if allow_change or set(diffs) - set(SOFT_LAYOUT) - set(PORTABLE_LAYOUT) else \
            " (checkpoint.allow_layout_change=true resumes anyway, as a new data order)"
        raise EngineError(f"cannot resume {ckpt}: it was saved with a different setup ({'; '.join(hard)}){hint}")
    inexact = [d for k, d in diffs.items() if k not in PORTABLE_LAYOUT]
    if inexact:
        what = " (the optimizer starts from a fresh state)" if "optimizer" in diffs else ""
        warn(f"warning: resuming {ckpt} with a changed setup ({'; '.join(inexact)}): not an exact continuation{what}")
    moved = [d for k, d in diffs.items() if k in PORTABLE_LAYOUT]
    if moved:
        warn(f"resuming {ckpt} on another layout ({'; '.join(moved)}): its weights and optimizer state are converted")
    return set(diffs)
