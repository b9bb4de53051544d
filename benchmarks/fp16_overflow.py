"""What the fp16 in-backward overflow rule does early in a run, while the loss scale is still falling.

The in-backward step cannot skip a step after the fact: a parameter whose fp16 gradient overflows skips its update
while the parameters stepped before it already moved. The rule before: step on, let the overflowing parameters skip,
halve the scale. The rule now (DynamicLossScale.untried): a scale that has not yet carried a clean step (the first
step, and after every change) is measured first by a backward that steps nothing, halved while it overflows, so no
parameter skips on it. A scale that has carried clean steps can still overflow later (gradients grow): then the
overflowing parameters skip and the scale halves, as before; exact clipping measures every step, so nothing ever
skips there. This trains the same run under each (RUNS) against fp32 and against the plain fp16 step (GradScaler,
which skips whole steps), and records per step the loss scale, the fraction of parameters that skipped, and the loss.

    .venv/bin/python benchmarks/fp16_overflow.py [--steps 40] [--init-scale 16] [--init-scale 24]

A 4-layer 128-wide GPT-2 (random init) on the code domain (benchmarks/data/code), 8-bit AdamW (the T4 preset's
optimizer), lr 5e-4, micro-batch 8 x 128 tokens, initial scales 2^16 (the default) and 2^24 (far too high: many
halvings early). fp16 on a CPU runs through autocast, with the same overflow behaviour as on a GPU. Results:
benchmarks/results/fp16_overflow/.
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


# name -> (precision, rule, optim.grad_clip / clip_in_backward, optimizer in backward): the rule "old" marks every
# scale tried (never measured: overflowing parameters skip, the rest step); "new" is the engine's rule. Without
# clipping the old rule's first step is not measured either; with stale clipping the first step measures (it needs a
# norm) under both; exact clipping measures every step; the plain step (GradScaler) skips whole steps.
RUNS = {
    "fp32": ("fp32", "new", "stale", True),
    "fp32, no clipping": ("fp32", "new", None, True),
    "fp16 in backward, no clipping, old rule": ("fp16", "old", None, True),
    "fp16 in backward, no clipping, new rule": ("fp16", "new", None, True),
    "fp16 in backward, stale clipping, old rule": ("fp16", "old", "stale", True),
    "fp16 in backward, stale clipping, new rule (default)": ("fp16", "new", "stale", True),
    "fp16 in backward, exact clipping": ("fp16", "new", "exact", True),
    "fp16 plain step (GradScaler: whole steps skip), clip 1.0": ("fp16", "new", "stale", False),
}


def run(name: str, steps: int, init_scale_power: int, work: Path) -> list[dict]:
    precision, rule, clip, in_backward = RUNS[name]
    train, valid = DOMAINS["code"]
    clipping = ["optim.grad_clip=null"] if clip is None else ["optim.grad_clip=1.0", f"optim.clip_in_backward={clip}"]
    cfg = load_config(None, [
        "model.init=random", "model.n_layer=4", "model.n_embd=128", "model.n_head=4", "model.n_positions=128",
        f"data.train_file={train}", f"data.validation_file={valid}", "data.block_size=128", "train.micro_batch_size=8",
        f"train.max_steps={steps}", "train.seed=1", "optim.name=adamw_8bit", "optim.lr=5e-4", *clipping,
        f"memory.optimizer_in_backward={str(in_backward).lower()}", f"memory.precision={precision}",
        "schedule.warmup_steps=4", "train.preflight=false", "logging.overwrite=true", "logging.progress=false",
        f"logging.output_dir={work / (name.replace(' ', '_').replace(',', '').replace(':', '') + f'-{init_scale_power}')}"])
    recipe = TrainingRecipe(cfg, dist_env())
    recipe.setup_data()
    recipe.setup_backend()
    backend = recipe.backend
    if in_backward:
        n_params, scaler = len(backend.optimizer.named), backend.loss_scale
        if scaler:
            scaler.scale = 2.0**init_scale_power
    else:
        backend.scaler._init_scale = 2.0**init_scale_power  # read when the scaler first scales
    rows = []
    for step in range(steps):
        if in_backward and rule == "old" and backend.loss_scale:
            backend.loss_scale.untried = False
        _, batches = recipe.sampler.step_batches(step)
        stats = backend.train_step(batches)
        skipped = backend.optimizer.skipped / n_params if in_backward else float(stats.skipped)
        rows.append({"step": step + 1, "loss": round(stats.loss, 5), "loss_scale": stats.loss_scale,
                     "skipped_fraction": round(skipped, 4)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--init-scale", type=int, action="append", help="log2 of the initial loss scale (default 16, 24)")
    args = ap.parse_args(argv)
    powers = args.init_scale or [16, 24]
    work = OUT / "runs"
    results = {name: run(name, args.steps, 0, work) for name in RUNS if name.startswith("fp32")}
    refs = {}  # each fp16 run against the fp32 run with the same clipping
    for power in powers:
        for name in RUNS:
            if not name.startswith("fp32"):
                results[f"{name}, initial scale 2^{power}"] = run(name, args.steps, power, work)
                refs[f"{name}, initial scale 2^{power}"] = "fp32, no clipping" if RUNS[name][2] is None else "fp32"
    lines = ["# fp16 in backward: the overflow rule early in a run", "",
             f"CPU: {cpu_name()}; {time.strftime('%Y-%m-%d')}; `.venv/bin/python benchmarks/fp16_overflow.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"fp32 at the last step: {results['fp32'][-1]['loss']:.4f} (clip 1.0), "
             f"{results['fp32, no clipping'][-1]['loss']:.4f} (no clipping).", "",
             "| run | steps with skipped parameters | parameters skipped (mean over those steps) | final scale | "
             "loss at the last step | vs fp32 (same clipping) | max loss gap to it over the run |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, ref_name in refs.items():
        rows, ref = results[name], results[ref_name]
        hit = [r["skipped_fraction"] for r in rows if r["skipped_fraction"] > 0]
        gap = max(abs(r["loss"] - q["loss"]) for r, q in zip(rows, ref))
        lines.append(f"| {name} | {len(hit)} | {100 * sum(hit) / len(hit) if hit else 0:.1f}% | "
                     f"2^{math.log2(rows[-1]['loss_scale']):.0f} | {rows[-1]['loss']:.4f} | "
                     f"{100 * (rows[-1]['loss'] - ref[-1]['loss']) / ref[-1]['loss']:+.2f}% | {gap:.4f} |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
