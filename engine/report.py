"""Watching runs: TensorBoard events while a run trains, PNG plots of `metrics.jsonl` after it.

`metrics.jsonl` is the one record of a run; the plots are drawn from it alone, so the plots written at the end
of `engine train` and those of `engine report RUN_DIR [RUN_DIR ...]` come from the same function and a crashed
or still-running run can be plotted too. matplotlib is used through `Figure` objects, never pyplot, so drawing
changes no global backend (a notebook keeps its inline plots) and needs no display.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import EngineError
from engine.run_dir import METRICS, PLOTS_DIR, TENSORBOARD_DIR
PLOT_FILES = ("loss.png", "lr.png", "tokens_per_s.png", "memory.png", "overview.png")

# metrics.jsonl key -> TensorBoard tag (the tag names the unit where there is one)
TB_TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "loss_scale": "train/loss_scale",
    "tokens_per_s": "perf/tokens_per_s",
    "peak_mem_mib": "memory/peak_MiB",
    "peak_reserved_mib": "memory/peak_reserved_MiB",
    "val_loss": "eval/val_loss",
    "val_ppl": "eval/val_ppl",
    "test_loss": "eval/test_loss",
    "test_ppl": "eval/test_ppl",
}


# ----------------------------------------------------------------------------- TensorBoard


class TensorBoardLog:
    """Scalars of each metrics record, at the record's optimizer step. Rank 0 only (the caller decides)."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise EngineError(
                "logging.tensorboard=true needs the tensorboard package: pip install tensorboard, or set "
                "logging.tensorboard=false"
            ) from None
        # purge_step: a resumed run rewrites the steps after its checkpoint; TensorBoard hides the old ones.
        # flush_secs: a live `tensorboard` sees new steps within seconds, not the default two minutes.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=10)

    def log(self, rec: dict) -> None:
        step = rec.get("step", 0)
        for key, tag in TB_TAGS.items():
            v = rec.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(tag, v, step)
        tracked = rec.get("tracked")
        if isinstance(tracked, dict) and "peak_mib" in tracked:
            self.writer.add_scalar("memory/tracked_peak_MiB", tracked["peak_mib"], step)

    def close(self) -> None:
        self.writer.close()


def open_tensorboard(enabled: bool, out: Path, purge_step: int | None = None) -> TensorBoardLog | None:
    return TensorBoardLog(out / TENSORBOARD_DIR, purge_step) if enabled else None


# ----------------------------------------------------------------------------- reading runs


@dataclass
class RunMetrics:
    name: str
    path: Path
    train: list[dict] = field(default_factory=list)  # one record per optimizer step
    evals: list[dict] = field(default_factory=list)  # val_loss / test_loss records

    def series(self, key: str, records: list[dict] | None = None) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for r in self.train if records is None else records:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                xs.append(r["step"])
                ys.append(float(v))
        return xs, ys

    def tracked_peak(self) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r["tracked"]["peak_mib"]) for r in self.train if isinstance(r.get("tracked"), dict)]
        return [p[0] for p in pts], [p[1] for p in pts]


def read_run(run_dir: str | Path, name: str | None = None) -> RunMetrics:
    """A run folder's metrics.jsonl, split into step and eval records; a bad folder is one EngineError line."""
    p = Path(run_dir)
    if not p.is_dir():
        raise EngineError(f"{p}: no such run folder")
    path = p / METRICS
    if not path.is_file():
        raise EngineError(f"{p}: no metrics.jsonl here (not a run folder, or the run has not finished a step yet)")
    run = RunMetrics(name=name or p.resolve().name, path=p)
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not text.endswith("\n"):
                break  # the run was killed while writing its last record
            raise EngineError(f"{path} line {i} is not JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise EngineError(f"{path} line {i} is not a metrics record (no integer 'step')")
        (run.train if "loss" in rec else run.evals).append(rec)
    if not run.train:
        raise EngineError(f"{path} records no training step")
    return run


def run_names(dirs: list[Path]) -> list[str]:
    """Folder names; where two runs share one, the shortest path suffix that tells them apart."""
    parts = [Path(d).resolve().parts for d in dirs]
    names = []
    for i, ps in enumerate(parts):
        for depth in range(1, len(ps) + 1):
            cand = ps[-depth:]
            if all(o[-depth:] != cand for j, o in enumerate(parts) if j != i and o != ps):
                break
        names.append("/".join(cand))
    return names


# ----------------------------------------------------------------------------- drawing


def smooth(ys: list[float]) -> list[float] | None:
    """Bias-corrected exponential moving average (TensorBoard's smoothing), span ~5% of the points."""
    if len(ys) < 20:
        return None
    beta = 1 - 2 / (max(2, len(ys) // 20) + 1)
    out, avg = [], 0.0
    for i, y in enumerate(ys, 1):
        avg = beta * avg + (1 - beta) * y
        out.append(avg / (1 - beta**i))
    return out


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _label(run: RunMetrics, what: str, several: bool) -> str:
    return f"{run.name}: {what}" if several else what


def _noisy(ax, run: RunMetrics, xs, ys, color, what: str, several: bool) -> None:
    """Raw values faint, their moving average bold (or the raw values bold when there are too few to smooth)."""
    sm = smooth(ys)
    if sm is None:
        ax.plot(xs, ys, color=color, lw=1.6, marker="." if len(xs) < 30 else None, label=_label(run, what, several))
    else:
        ax.plot(xs, ys, color=color, lw=0.8, alpha=0.3)
        ax.plot(xs, sm, color=color, lw=1.8, label=_label(run, f"{what} (moving avg.)", several))


def draw_loss(ax, runs: list[RunMetrics]) -> None:
    several = len(runs) > 1
    top = []
    for run, c in zip(runs, _colors(len(runs))):
        # One run: a colour per series. Several: a colour per run, the series told apart by line style.
        vc, tc = (c, c) if several else ("tab:orange", "tab:red")
        xs, ys = run.series("loss")
        _noisy(ax, run, xs, ys, c, "train", several)
        vx, vy = run.series("val_loss", run.evals)
        if vx:
            ax.plot(vx, vy, color=vc, ls="--", marker="o", ms=5, lw=1.4, label=_label(run, "validation", several))
        tx, ty = run.series("test_loss", run.evals)
        if tx:
            ax.plot(tx, ty, color=tc, ls="none", marker="*", ms=11, label=_label(run, "test", several))
        # The first steps of a fresh model sit far above the rest; let the y range follow the later 90%.
        tail = (smooth(ys) or ys)[len(ys) // 10:]
        top.append(max(tail + vy + ty))
    lo, hi = ax.get_ylim()
    first = max(run.train[0]["loss"] for run in runs)
    if first > max(top) * 1.3:
        ax.set_ylim(lo, max(top) * 1.15)
        ax.annotate(f"step 1 loss {first:.2f} (above the plot)", xy=(0.99, 0.98), xycoords="axes fraction",
                    ha="right", va="top", fontsize=8, color="0.35")
    ax.set_title("Loss")
    ax.set_ylabel("cross-entropy (nats / token)")


def draw_lr(ax, runs: list[RunMetrics]) -> None:
    for run, c in zip(runs, _colors(len(runs))):
        xs, ys = run.series("lr")
        ax.plot(xs, ys, color=c, lw=1.8, label=run.name if len(runs) > 1 else "learning rate")
    ax.set_title("Learning rate")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_ylim(bottom=0)


def draw_tokens_per_s(ax, runs: list[RunMetrics]) -> None:
    several = len(runs) > 1
    for run, c in zip(runs, _colors(len(runs))):
        xs, ys = run.series("tokens_per_s")
        _noisy(ax, run, xs, ys, c, "tokens/s", several)
    ax.set_title("Throughput")
    ax.set_ylabel("tokens / s (global batch, all ranks)")
    ax.set_ylim(bottom=0)


def _memory_kind(run: RunMetrics) -> str:
    # peak_reserved_mib is only logged on CUDA; elsewhere peak_mem_mib is the process's peak RSS.
    return "GPU allocated" if any("peak_reserved_mib" in r for r in run.train) else "process peak RSS"


def draw_memory(ax, runs: list[RunMetrics]) -> None:
    several = len(runs) > 1
    for run, c in zip(runs, _colors(len(runs))):
        xs, ys = run.series("peak_mem_mib")
        ax.plot(xs, ys, color=c, lw=1.8, label=_label(run, _memory_kind(run), several))
        rx, ry = run.series("peak_reserved_mib")
        if rx:
            ax.plot(rx, ry, color=c, lw=1.2, ls="--", label=_label(run, "GPU reserved", several))
        tx, ty = run.tracked_peak()
        if tx:
            ax.plot(tx, ty, color=c, lw=1.2, ls=":", label=_label(run, "tracked tensors", several))
    ax.set_title("Peak memory up to each step (rank 0)")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)


DRAW = {
    "loss.png": draw_loss,
    "lr.png": draw_lr,
    "tokens_per_s.png": draw_tokens_per_s,
    "memory.png": draw_memory,
}


def _finish(ax, fname: str) -> None:
    ax.set_xlabel("optimizer step")
    ax.grid(True, alpha=0.3)
    # peak memory only rises: "best" would put the legend on its plateau
    ax.legend(fontsize=8, loc="lower right" if fname == "memory.png" else "best")


def _title(runs: list[RunMetrics]) -> str:
    return runs[0].name if len(runs) == 1 else f"{len(runs)} runs: " + ", ".join(r.name for r in runs)


def write_plots(runs: list[RunMetrics], out_dir: str | Path) -> list[Path]:
    """One PNG per quantity and an overview of all four, for one run or several overlaid."""
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, draw in DRAW.items():
        fig = Figure(figsize=(8, 4.8), layout="constrained")
        ax = fig.subplots()
        draw(ax, runs)
        _finish(ax, fname)
        fig.suptitle(_title(runs), fontsize=10, color="0.3")
        fig.savefig(out / fname, dpi=110)
        written.append(out / fname)
    fig = Figure(figsize=(13, 8.5), layout="constrained")
    for ax, (fname, draw) in zip(fig.subplots(2, 2).flat, DRAW.items()):
        draw(ax, runs)
        _finish(ax, fname)
    fig.suptitle(_title(runs), fontsize=12)
    fig.savefig(out / "overview.png", dpi=100)
    written.append(out / "overview.png")
    return written


def plot_run(run_dir: str | Path) -> list[Path]:
    """The end-of-run plots: RUN_DIR/plots/*.png."""
    return write_plots([read_run(run_dir)], Path(run_dir) / PLOTS_DIR)
