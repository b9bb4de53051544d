"""Fine-tuning quality of every low-memory recipe against the fp32-master AdamW reference.

A small GPT-2 is pretrained by the engine on one domain (the shipped sample corpus: synthetic short stories), then
fine-tuned on another (benchmarks/data/docs: technical prose from Python's docstrings) with each recipe: same
steps, tokens, schedule, data order and seeds. Reported per recipe: final validation loss and perplexity (mean and
spread over the seeds), the gap to the reference's loss, whether it is within 2%, tokens/s on this machine.

    .venv/bin/python benchmarks/quality.py                      # 4-layer 128-wide model, 3 seeds
    .venv/bin/python benchmarks/quality.py --size gpt2-medium   # gpt2-medium, random init, 1 seed, fewer steps

`--size gpt2-medium` cannot pretrain a 355M model on a CPU in useful time: it fine-tunes the random-init
architecture directly on the docs domain (1 seed, --steps 20 by default, validation on its first 8 batches), which compares the recipes' optimisation
at that size, not their effect on a pretrained model. Results: benchmarks/results/quality/<size>/.

Recipes (each a recipe of engine/recipes.py under the same key, in a pinned precision; RECIPES below):
  reference         AdamW, fp32 weights and compute, grad clip 1.0
  adamw_bf16        control: the reference under bf16 autocast (what bf16 compute alone costs)
  adamw_8bit_inb    8-bit AdamW stepped inside backward, fp32 weights (gpt2-xl_full_t4's optimizer; no clipping)
  bf16_8bit         bf16 weights with stochastic rounding + 8-bit AdamW in backward (gpt2-xl_full_8gb)
  bf16_4bit         bf16 weights + 4-bit AdamW (torchao) in backward
  bf16_adafactor    bf16 weights + Adafactor (factored, no momentum) in backward
  lora              LoRA r=16 on c_attn/c_proj/c_fc, bf16 compute, lr x LORA_LR_FACTOR
  qlora             the same over an NF4 base (double quantization)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DOCS = ROOT / "benchmarks" / "data" / "docs"
OUT = ROOT / "benchmarks" / "results" / "quality"

from engine.recipes import CATALOG, precision  # noqa: E402

FP32, BF16 = precision("fp32"), precision("bf16")
NO_DROPOUT = ("memory.lora.dropout=0.0",)  # this benchmark's adapters train without dropout (the default is 0.05)
LORA_LR_FACTOR = 5  # adapters train at a higher lr than full fine-tunes (the LoRA presets do the same)


def from_catalog(key: str, *extra: str) -> list[str]:
    """A catalog recipe's overrides (engine/recipes.py) with this benchmark's own settings after them."""
    return [*CATALOG[key].overrides, *extra]


# name -> overrides: the catalog's recipes under their quality keys (engine.plan.QUALITY_GAP_PCT records their
# results under the same names), each in the precision it is measured in; the reference and its bf16 control are
# the catalog's AdamW.
RECIPES = {
    "reference": from_catalog("adamw", *FP32),
    "adamw_bf16": from_catalog("adamw", *BF16),
    "adamw_8bit_inb": from_catalog("adamw_8bit_inb", *FP32),
    "bf16_8bit": from_catalog("bf16_8bit", *BF16),
    "bf16_4bit": from_catalog("bf16_4bit", *BF16),
    "bf16_adafactor": from_catalog("bf16_adafactor", *BF16),
    "lora": from_catalog("lora", *NO_DROPOUT, *BF16),
    "qlora": from_catalog("qlora", *NO_DROPOUT, *BF16),
}
SIZES = {
    # size: (model overrides, micro-batch, pretrain steps, fine-tune steps, lr, seeds)
    "small": (["model.name=gpt2", "model.n_layer=4", "model.n_embd=128", "model.n_head=4", "model.n_positions=128"],
              8, 300, 150, 5e-4, [1, 2, 3]),
    # (the shape spelled out: the default preset underneath sets a tiny one)
    "gpt2-medium": (["model.name=gpt2-medium", "model.n_layer=24", "model.n_embd=1024", "model.n_head=16",
                     "model.n_positions=128"], 4, 0, 20, 1e-4, [1]),
}
BLOCK = 128


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def engine_train(overrides: list[str], out: Path) -> dict:
    """One `engine train` in its own process; returns its final eval and its median tokens/s. A run folder that
    already holds a finished run (summary.json) is read, not rerun: an interrupted benchmark continues."""
    if not (out / "summary.json").is_file():
        _run_engine_train(overrides, out)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in recs if "val_loss" in x]
    tps = [x["tokens_per_s"] for x in recs if "tokens_per_s" in x]
    return {"val_loss": evals[-1]["val_loss"] if evals else None, "val_ppl": evals[-1]["val_ppl"] if evals else None,
            "curve": [(x["step"], round(x["val_loss"], 4)) for x in evals],
            "tokens_per_s": statistics.median(tps) if tps else None}


def _run_engine_train(overrides: list[str], out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)  # an unfinished run: start it again
    cmd = [sys.executable, "-m", "engine.cli", "train", *overrides, f"logging.output_dir={out}",
           "logging.progress=false", "logging.plots=false", "sample.max_new_tokens=0", "train.preflight=false",
           "checkpoint.every_n_steps=0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ENGINE_LOG": str(out.parent / "engine.log")}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"engine train failed ({out.name}): {(r.stderr or r.stdout).strip().splitlines()[-1:]}")


def pretrain(model: list[str], micro: int, steps: int, lr: float, out: Path) -> Path:
    """The base model: the sample corpus (the engine's default data), AdamW fp32, seed 0."""
    engine_train([*model, "model.init=random", f"data.block_size={BLOCK}", f"train.micro_batch_size={micro}",
                  f"train.max_steps={steps}", "train.seed=0", f"optim.lr={lr * 3}", "optim.name=adamw",
                  "memory.precision=fp32", "schedule.warmup_steps=50", "eval.every_n_steps=0"], out)
    return out / "model"


def fine_tune(base: list[str], name: str, seed: int, micro: int, steps: int, lr: float, out: Path,
              extra: tuple[str, ...] = ()) -> dict:
    rlr = lr * (LORA_LR_FACTOR if "memory.lora.enabled=true" in RECIPES[name] else 1)
    return engine_train([*base, f"data.train_file={DOCS / 'train.txt'}", f"data.validation_file={DOCS / 'valid.txt'}",
                         f"data.block_size={BLOCK}", f"train.micro_batch_size={micro}", f"train.max_steps={steps}",
                         f"train.seed={seed}", f"optim.lr={rlr}", "schedule.warmup_steps=30", "schedule.decay=cosine",
                         f"eval.every_n_steps={max(steps // 3, 1)}", *extra, *RECIPES[name]], out)


def summarise(runs: dict[str, list[dict]]) -> list[dict]:
    ref = statistics.mean(r["val_loss"] for r in runs["reference"])
    rows = []
    for recipe, rs in runs.items():
        losses = [r["val_loss"] for r in rs]
        mean = statistics.mean(losses)
        gap = 100 * (mean - ref) / ref
        rows.append({"recipe": recipe, "overrides": RECIPES[recipe], "seeds": len(rs), "val_loss": round(mean, 4),
                     "val_loss_sd": round(statistics.stdev(losses), 4) if len(rs) > 1 else None,
                     "val_ppl": round(statistics.mean(r["val_ppl"] for r in rs), 2), "gap_pct": round(gap, 2),
                     "within_2pct": abs(gap) <= 2.0,
                     "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rs), 1),
                     "runs": rs})
    return rows


def markdown(rows: list[dict], env: dict) -> str:
    lines = [f"# Fine-tuning quality vs the fp32-master AdamW reference ({env['size']})", "",
             f"{env['device']}; torch {env['torch']}; {env['date']}; `{env['command']}`", "",
             "| recipe | final val loss (mean ± sd) | perplexity | gap vs reference | within 2% | tokens/s |",
             "|---|---:|---:|---:|:-:|---:|"]
    for r in rows:
        sd = f" ± {r['val_loss_sd']:.4f}" if r["val_loss_sd"] is not None else ""
        lines.append(f"| {r['recipe']} | {r['val_loss']:.4f}{sd} | {r['val_ppl']:.2f} | {r['gap_pct']:+.2f}% | "
                     f"{'yes' if r['within_2pct'] else 'NO'} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--steps", type=int, help="fine-tune steps (default: the size's)")
    ap.add_argument("--pretrain-steps", type=int, help="pretraining steps (default: the size's)")
    ap.add_argument("--seeds", type=int, nargs="*", help="default: the size's")
    ap.add_argument("--recipes", nargs="*", choices=list(RECIPES), help="default: all (reference always)")
    ap.add_argument("--out", help="default: benchmarks/results/quality/<size>")
    args = ap.parse_args(argv)
    import torch

    model, micro, pre_steps, steps, lr, seeds = SIZES[args.size]
    steps, seeds = args.steps or steps, args.seeds or seeds
    pre_steps = pre_steps if args.pretrain_steps is None else args.pretrain_steps
    out = Path(args.out) if args.out else OUT / args.size
    work = out / "runs"  # run folders (not committed)
    recipes = ["reference"] + [r for r in (args.recipes or RECIPES) if r != "reference"]
    if pre_steps:
        base = ["model.init=pretrained", f"model.name={pretrain(model, micro * 2, pre_steps, lr, work / 'pretrain')}"]
    else:
        base = [*model, "model.init=random"]
    runs: dict[str, list[dict]] = {}
    for recipe in recipes:
        for seed in seeds:
            r = fine_tune(base, recipe, seed, micro, steps, lr, work / f"{recipe}-seed{seed}",
                          () if pre_steps else ("eval.max_batches=8",))  # gpt2-medium: 4k validation tokens
            runs.setdefault(recipe, []).append({"seed": seed, **r})
            print(f"{recipe:15s} seed {seed}: val_loss {r['val_loss']:.4f} ppl {r['val_ppl']:.2f} "
                  f"({r['tokens_per_s']:,.0f} tok/s)", flush=True)
    rows = summarise(runs)
    env = {"size": args.size, "device": f"CPU: {cpu_name()}, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "command": " ".join([".venv/bin/python", "benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])]),
           "pretrain_steps": pre_steps, "fine_tune_steps": steps, "block_size": BLOCK, "micro_batch": micro,
           "lr": lr, "lora_lr_factor": LORA_LR_FACTOR}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    (out / "results.md").write_text(markdown(rows, env))
    print(markdown(rows, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
