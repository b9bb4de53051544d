"""`engine report`: redraw a run's plots, or overlay several runs (engine/report.py)."""

from __future__ import annotations

from pathlib import Path

from engine.report import read_run, run_names, write_plots
from engine.run_dir import PLOTS_DIR

NAME = "report"
HELP = 'plot runs from their metrics.jsonl (loss, lr, tokens/s, peak memory); several runs overlaid'


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (each holds a metrics.jsonl)")
    p.add_argument("--out", "-o", default=None, metavar="DIR",
                   help="where to write the PNGs (default: RUN_DIR/plots for one run, ./report for several)")


def run(args) -> int:
    dirs = [Path(d) for d in args.runs]
    runs = [read_run(d, name) for d, name in zip(dirs, run_names(dirs))]
    out = Path(args.out) if args.out else (dirs[0] / PLOTS_DIR if len(dirs) == 1 else Path("report"))
    written = write_plots(runs, out)
    print(f"wrote {len(written)} plots of {len(runs)} run(s) to {out}: {', '.join(p.name for p in written)}")
    return 0
