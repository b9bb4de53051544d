"""Accuracy of `engine plan`'s memory predictions against every configuration the benchmarks measured on this CPU.

The planner predicts with `simulate_deep` (shallow models, phase-wise extrapolation in depth). Here it predicts,
with this CPU's kernels, the configurations measured for real in
  benchmarks/results/cpu_gpt2/, zero3_reuse/   (benchmarks/run.py, gpt2, incl. 2-rank ZeRO runs: rank 0)
  benchmarks/results/simulation_validation/    (gpt2 and gpt2-medium)
  benchmarks/results/single_device/            (gpt2-large and gpt2-xl)
and compares with the measured (tracked) peaks. The HF Trainer baseline is predicted from its recipe.

    .venv/bin/python benchmarks/plan_accuracy.py     # -> benchmarks/results/plan_accuracy/results.md
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
MATRICES = ("cpu_gpt2", "zero3_reuse")  # measured matrices (benchmarks/run.py) with committed results


def measured_configs() -> list[dict]:
    """(source, name, overrides, world, measured MiB) of every measured configuration with committed results."""
    from benchmarks.run import BASELINE_RECIPE, expand, split_world
    from benchmarks.validate_simulation import BASELINE, CONFIGS

    out = []
    for name in MATRICES:
        matrix = yaml.safe_load((ROOT / "benchmarks/matrices" / f"{name}.yaml").read_text())
        jobs = dict(expand(matrix))
        for row in csv.DictReader(open(RESULTS / name / "results.csv")):
            if not row.get("peak_mib"):
                continue
            if row["name"].startswith("baseline"):
                ov, world = list(matrix["base"]) + BASELINE_RECIPE, 1
            else:
                ov, world = split_world(jobs[row["name"]], int(matrix.get("world_size", 1)))
            out.append({"source": name, "name": row["name"], "overrides": ov, "world": world,
                        "measured_mib": float(row["peak_mib"])})
    val = json.loads((RESULTS / "simulation_validation" / "results.json").read_text())
    for row in val["rows"]:
        if "measured_peak_mib" not in row:
            continue
        base = ["model.init=random", f"model.name={row['model']}", f"data.block_size={row['seq']}",
                f"train.micro_batch_size={row['micro_batch']}"]
        ov = base + (BASELINE_RECIPE if row["config"] == BASELINE else CONFIGS[row["config"]])
        out.append({"source": "simulation_validation", "name": f"{row['model']} {row['config']}", "overrides": ov,
                    "world": 1, "measured_mib": row["measured_peak_mib"]})
    for path in sorted((RESULTS / "single_device").glob("*.json")):
        row = json.loads(path.read_text())
        ov = ["--config", row["preset"]] + row["overrides"]
        out.append({"source": "single_device", "name": row["config"], "overrides": ov, "world": 1,
                    "measured_mib": row["measured_peak_gib"] * 1024})
    return out


def predict(overrides: list[str], world: int) -> tuple[float, float, str]:
    from engine.config import resolve_config_path
    from engine.config import load_config
    from engine.memory.simulate import simulate_deep

    paths = [resolve_config_path(overrides[1])] if overrides[:1] == ["--config"] else []
    cfg = load_config(paths, overrides[2:] if paths else overrides)
    sim = simulate_deep(cfg, kernel="cpu", zero_world=world)
    # On a CPU, "offloaded" states live in the same memory the tracker measures (as the pre-flight counts them).
    host = (sim.zero or {}).get("host", 0)
    return (sim.peak_bytes + host) / 2**20, sim.seconds, sim.notes[-1] if sim.notes else "full simulation"


def main() -> None:
    from tqdm import tqdm

    rows = []
    for c in tqdm(measured_configs(), desc="predict", unit="config"):
        mib, seconds, how = predict(c["overrides"], c["world"])
        rows.append({**c, "predicted_mib": mib, "error_pct": 100 * (mib - c["measured_mib"]) / c["measured_mib"],
                     "seconds": seconds, "how": how})
    out = RESULTS / "plan_accuracy"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    lines = ["`engine plan`'s prediction (simulate_deep, this CPU's kernels) vs the tracked peak measured by the "
             "benchmarks on this CPU (rank 0 for 2-rank runs). Command: `.venv/bin/python benchmarks/plan_accuracy.py`"
             f" ({time.strftime('%Y-%m-%d')}).", "",
             "| source | configuration | ranks | measured MiB | predicted MiB | error | predict s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['source']} | {r['name']} | {r['world']} | {r['measured_mib']:,.1f} | {r['predicted_mib']:,.1f} "
                     f"| {r['error_pct']:+.2f}% | {r['seconds']:.1f} |")
    errs = [abs(r["error_pct"]) for r in rows]
    lines += ["", f"{len(rows)} configurations; max |error| {max(errs):.2f}%, mean |error| {sum(errs) / len(errs):.2f}%."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
