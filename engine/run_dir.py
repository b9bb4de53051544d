"""The run folder (`logging.output_dir`): never overwritten by accident, cleared on request, rewound on resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from engine.config import RunConfig
from engine.errors import EngineError

RUN_MARKER = "run.json"
METRICS = "metrics.jsonl"

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
