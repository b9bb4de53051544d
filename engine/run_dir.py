"""The run folder (`logging.output_dir`): never overwritten by accident, cleared on request, rewound on resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from engine.config import RunConfig
from engine.errors import EngineError

# Every name in a run folder, here and nowhere else in engine/ (checkpoints' own files: engine.checkpoint and the
# backends' layouts).
RUN_MARKER = "run.json"  # marks a run folder: the plan and start time
CONFIG = "config.yaml"  # the run's resolved config
METRICS = "metrics.jsonl"  # the one record of a run
SUMMARY = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"  # the HF export
ADAPTER_DIR = "adapter"  # a LoRA run's peft adapter
TENSORBOARD_DIR = "tensorboard"
PLOTS_DIR = "plots"


def is_run_dir(p: Path) -> bool:
    return (p / RUN_MARKER).is_file() and (p / CONFIG).is_file()

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
    for name in (CHECKPOINTS_DIR, MODEL_DIR, ADAPTER_DIR, TENSORBOARD_DIR, PLOTS_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (METRICS, SUMMARY, RUN_MARKER):
        (out / name).unlink(missing_ok=True)


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
    path.write_text("".join(l + "\n" for l in keep))
