"""What the fp16 in-backward overflow rule does early in a run, while the loss scale is still falling.

The in-backward step cannot skip a step after the fact: a parameter whose fp16 gradient overflows skips its update
while the parameters stepped before it already moved. The rule before: step on, let the overflowing parameters skip,
halve the scale. The rule now (DynamicLossScale.untried): a scale that has not yet carried a clean step (the first
step, and after every change) is measured first by a backward that steps nothing, halved while it overflows, so no
parameter skips. This trains the same run three ways - fp32 (the reference), fp16 under the old rule, fp16 under the
new one - and records per step the loss scale, the fraction of parameters that skipped, and the loss.

    .venv/bin/python benchmarks/fp16_overflow.py [--steps 40] [--init-scale 16] [--init-scale 24]

A 4-layer 128-wide GPT-2 (random init) on the code domain (benchmarks/data/code), 8-bit AdamW stepped in backward
(the T4 preset's optimizer), lr 5e-4, clip 1.0 (stale), micro-batch 8 x 128 tokens. fp16 on a CPU is emulated
(slowly), with the same overflow behaviour as on a GPU. Results: benchmarks/results/fp16_overflow/.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.quality import DOMAINS, cpu_name  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.distributed import dist_env  # noqa: E402
from engine.train import TrainingRecipe  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "fp16_overflow"


def run(precision: str, rule: str, steps: int, init_scale_power: int, work: Path) -> list[dict]:
    train, valid = DOMAINS["code"]
    cfg = load_config(None, [
        "model.init=random", "model.n_layer=4", "model.n_embd=128", "model.n_head=4", "model.n_positions=128",
        f"data.train_file={train}", f"data.validation_file={valid}", "data.block_size=128", "train.micro_batch_size=8",
        f"train.max_steps={steps}", "train.seed=1", "optim.name=adamw_8bit", "optim.lr=5e-4", "optim.grad_clip=1.0",
        "memory.optimizer_in_backward=true", f"memory.precision={precision}", "schedule.warmup_steps=4",
        "train.preflight=false", f"logging.output_dir={work / f'{precision}-{rule}-{init_scale_power}'}",
        "logging.overwrite=true", "logging.progress=false"])
    recipe = TrainingRecipe(cfg, dist_env())
    recipe.setup_data()
    recipe.setup_backend()
    backend = recipe.backend
    n_params = len(backend.optimizer.named)
    if backend.loss_scale:
        backend.loss_scale.scale = 2.0**init_scale_power
    rows = []
    for step in range(steps):
        if rule == "old" and backend.loss_scale:
            backend.loss_scale.untried = False  # never measured first: overflowing parameters skip, the rest step
        _, batches = recipe.sampler.step_batches(step)
        stats = backend.train_step(batches)
        rows.append({"step": step + 1, "loss": round(stats.loss, 5), "loss_scale": stats.loss_scale,
                     "skipped_fraction": round(backend.optimizer.skipped / n_params, 4)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--init-scale", type=int, action="append", help="log2 of the initial loss scale (default 16, 24)")
    args = ap.parse_args(argv)
    powers = args.init_scale or [16, 24]
    work = OUT / "runs"
    results = {"fp32": run("fp32", "-", args.steps, 0, work)}
    for power in powers:
        for rule in ("old", "new"):
            results[f"fp16 {rule} rule, scale 2^{power}"] = run("fp16", rule, args.steps, power, work)
    ref = results["fp32"]
    lines = ["# fp16 in backward: the overflow rule early in a run", "",
             f"CPU: {cpu_name()}; {time.strftime('%Y-%m-%d')}; `.venv/bin/python benchmarks/fp16_overflow.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             "| run | steps with skipped parameters | parameters skipped (mean over those steps) | final scale | "
             "loss at the last step (fp32: " + f"{ref[-1]['loss']:.4f}) | max loss gap to fp32 |", "|---|---:|---:|---:|---:|---:|"]
    for name, rows in results.items():
        if name == "fp32":
            continue
        hit = [r["skipped_fraction"] for r in rows if r["skipped_fraction"] > 0]
        gap = max(abs(r["loss"] - q["loss"]) for r, q in zip(rows, ref))
        lines.append(f"| {name} | {len(hit)} | {100 * sum(hit) / len(hit) if hit else 0:.1f}% | "
                     f"2^{math.log2(rows[-1]['loss_scale']):.0f} | "
                     f"{rows[-1]['loss']:.4f} | {gap:.4f} |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
