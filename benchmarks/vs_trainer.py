"""The engine against the HF Trainer at equal settings, side by side on this machine.

Both sides train the same architecture from the same random init (the engine's random init is GPT2LMHeadModel built
under the run's seed, which the Trainer side builds too), on the same packed blocks in the same order (documents
tokenized with EOS, concatenated and cut into full blocks: run_clm's group_texts; the Trainer side is handed the
engine's own blocks in the engine sampler's order, with a sequential sampler), with the same micro-batch, lr, linear
warmup + cosine to 0, weight decay (matrices only on both sides), gradient clipping at 1.0, steps and precision
(fp32, or bf16 autocast). Each side keeps its own implementation of everything else (the Trainer: HF's GELU, its
AdamW and schedule; the engine: its plain step). Reported: tokens/s over the steady-state steps (median of the
per-step intervals after the first WARMUP steps, data loading included on both sides) and the final validation loss
over the whole validation split.

    .venv/bin/python benchmarks/vs_trainer.py                               # both shapes, fp32 and bf16
    .venv/bin/python benchmarks/vs_trainer.py --shape gpt2 --precision fp32 --steps 30
    .venv/bin/python benchmarks/vs_trainer.py --best train.compile_blocks=true ...

The Trainer runs twice: as it comes, and with the engine's memory.keep_host_memory (glibc's allocator set as the
engine sets it). The engine side runs its plain step, then its best speed configuration (--best; BEST by default).
Each run is its own process. Results: benchmarks/results/vs_trainer/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.devices import cpu_name  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "vs_trainer"
DOCS = ROOT / "benchmarks" / "data" / "docs"
WARMUP = 3  # steps left out of tokens/s: the first steps allocate, and a compiled side compiles
SHAPES = {  # shape: (model overrides, steps)
    "4-layer": (["model.name=gpt2", "model.n_layer=4", "model.n_embd=256", "model.n_head=4"], 60),
    "gpt2": (["model.name=gpt2"], 30),
}
# The engine's best speed configuration on this CPU (measured: compiled blocks do not pay here, README).
BEST = ["train.fast_dropout=true", "memory.fused_head_loss=true", "memory.keep_host_memory=true"]
# The Trainer run a second time with the engine's host-memory setting (the Trainer side reads it from the same
# config), so the table shows how much of the engine's lead is glibc's allocator and how much its own step.
TRAINER_KEPT = ["memory.keep_host_memory=true"]
NO_PRESET = "no_preset.yaml"  # in the runs folder: `engine train --config` it instead of the default preset


def settings(shape: str, precision: str, steps: int, seq: int, micro: int) -> list[str]:
    """The engine overrides both sides train by (the Trainer side reads them through the same config)."""
    model, _ = SHAPES[shape]
    return [*model, "model.init=random", f"data.train_file={DOCS / 'train.txt'}",
            f"data.validation_file={DOCS / 'valid.txt'}", f"data.block_size={seq}", f"train.micro_batch_size={micro}",
            f"train.max_steps={steps}", "train.seed=1", "optim.name=adamw", "optim.lr=5e-4", "optim.weight_decay=0.1",
            "optim.grad_clip=1.0", "schedule.warmup_steps=5", "schedule.decay=cosine", "schedule.min_lr_ratio=0.0",
            f"memory.precision={precision}", "eval.every_n_steps=0", "eval.max_batches=null"]


def engine_side(overrides: list[str], out: Path) -> dict:
    # The schema's defaults under the overrides, as the Trainer side reads them (load_config without a file), not
    # `engine train`'s default preset (a small model): an empty config file in its place.
    cmd = [sys.executable, "-m", "engine.cli", "train", "--config", str(out.parent / NO_PRESET), *overrides,
           f"logging.output_dir={out}", "logging.overwrite=true", "logging.log_every=1", "logging.progress=false",
           "logging.plots=false", "logging.tensorboard=false", "sample.max_new_tokens=0", "train.preflight=false", "checkpoint.every_n_steps=0"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"engine train failed: {(r.stderr or r.stdout).strip().splitlines()[-3:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "tokens_per_s" in x]
    summary = json.loads((out / "summary.json").read_text())
    return {"tokens_per_s": statistics.median(x["tokens_per_s"] for x in steps[WARMUP:]),
            "val_loss": [x for x in recs if "val_loss" in x][-1]["val_loss"], "first_train_loss": steps[0]["loss"],
            "last_train_loss": steps[-1]["loss"],
            "compile_s": summary.get("compile_s")}


def trainer_side(overrides: list[str], out: Path) -> dict:
    """The HF Trainer on the engine's blocks, in the engine's order (run in its own process: `--trainer-side`)."""
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from engine.config import load_config
    from engine.devices import keep_freed_host_memory
    from engine.distributed import dist_env
    from engine.model import load_base_model
    from engine.train import TrainingRecipe

    cfg = load_config(None, [*overrides, f"logging.output_dir={out}", "logging.overwrite=true",
                             "train.preflight=false"])
    keep_freed_host_memory(cfg.memory.keep_host_memory)  # as `engine train` sets it
    recipe = TrainingRecipe(cfg, dist_env())
    recipe.setup_data()
    steps, micro = cfg.train.max_steps, cfg.train.micro_batch_size
    ids = torch.cat([recipe.sampler.step_batches(s)[1][0]["input_ids"] for s in range(steps)])
    train = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    val_ids = torch.cat([b["input_ids"] for b in recipe.val_batches])
    val = Dataset.from_dict({"input_ids": val_ids.tolist(), "labels": val_ids.tolist()})
    model = load_base_model(recipe.cfg, len(recipe.tok))  # the engine's random init: the same weights
    model.config.use_cache = False

    bf16 = recipe.cfg.memory.precision == "bf16"
    args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=micro, per_device_eval_batch_size=micro,
        max_steps=steps, learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.betas[0], adam_beta2=cfg.optim.betas[1], adam_epsilon=cfg.optim.eps,
        max_grad_norm=cfg.optim.grad_clip, lr_scheduler_type="cosine", warmup_steps=cfg.schedule.warmup_steps,
        train_sampling_strategy="sequential",  # the engine sampler's order, not a reshuffle
        bf16=bf16, use_cpu=not torch.cuda.is_available(), seed=cfg.train.seed, report_to=[], save_strategy="no",
        logging_strategy="steps", logging_steps=1, eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    ends: list[float] = []
    losses: list[float] = []  # per step (HF logs the step's loss; the engine reads its loss every step too)

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                      data_collator=default_data_collator, callbacks=[Clock()])
    result = trainer.train()
    ev = trainer.evaluate()
    intervals = [b - a for a, b in zip(ends, ends[1:])][WARMUP - 1:]
    tokens = micro * cfg.data.block_size
    return {"tokens_per_s": tokens / statistics.median(intervals), "val_loss": ev["eval_loss"],
            "first_train_loss": losses[0] if losses else None, "last_train_loss": losses[-1] if losses else None,
            "train_loss_mean": result.training_loss}


def run_side(side: str, overrides: list[str], out: Path) -> dict:
    if side == "engine":
        return engine_side(overrides, out)
    r = subprocess.run([sys.executable, __file__, "--trainer-side", json.dumps(overrides), str(out)], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"the Trainer side failed: {(r.stderr or r.stdout).strip().splitlines()[-3:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="*", choices=list(SHAPES), help="default: all")
    ap.add_argument("--precision", nargs="*", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, help="default: the shape's")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--best", nargs="*", default=BEST, help="the engine's best speed configuration (overrides)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--trainer-side", nargs=2, metavar=("OVERRIDES", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.trainer_side:
        print(json.dumps(trainer_side(json.loads(args.trainer_side[0]), Path(args.trainer_side[1]))))
        return 0
    import torch

    out = Path(args.out)
    work = out / "runs"
    work.mkdir(parents=True, exist_ok=True)
    (work / NO_PRESET).write_text("{}\n")
    rows = []
    for shape in args.shape or SHAPES:
        steps = args.steps or SHAPES[shape][1]
        for precision in args.precision:
            common = settings(shape, precision, steps, args.seq, args.micro)
            sides = {"HF Trainer": ("trainer", common),
                     f"HF Trainer, {' '.join(TRAINER_KEPT)}": ("trainer", [*common, *TRAINER_KEPT]),
                     "engine, plain step": ("engine", common),
                     f"engine, best ({' '.join(args.best)})": ("engine", [*common, *args.best])}
            results = {}
            for name, (side, overrides) in sides.items():
                results[name] = run_side(side, overrides, work / f"{shape}-{precision}-{side}-{len(results)}")
                print(f"{shape:8s} {precision} {name:60s} {results[name]['tokens_per_s']:8.1f} tok/s  "
                      f"val_loss {results[name]['val_loss']:.4f}", flush=True)
            ref = results["HF Trainer"]
            for name, r in results.items():
                rows.append({"shape": shape, "precision": precision, "side": name, "steps": steps, **r,
                             "speed_vs_trainer": r["tokens_per_s"] / ref["tokens_per_s"],
                             "val_loss_vs_trainer_pct": 100 * (r["val_loss"] - ref["val_loss"]) / ref["val_loss"]})
    env = {"device": f"CPU: {cpu_name()}, {torch.get_num_threads()} threads" if not torch.cuda.is_available()
           else torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "command": " ".join([".venv/bin/python", "benchmarks/vs_trainer.py", *(argv or sys.argv[1:])]),
           "seq": args.seq, "micro": args.micro, "warmup_steps_left_out": WARMUP}
    lines = ["# The engine against the HF Trainer at equal settings", "",
             f"{env['device']}; torch {env['torch']}; {env['date']}; `{env['command']}`; sequence {args.seq}, "
             f"micro-batch {args.micro}, lr 5e-4, warmup 5 + cosine to 0, weight decay 0.1, clip 1.0, same init, "
             "data and order", "",
             "| shape | precision | side | steps | tokens/s | vs Trainer | final val loss | vs Trainer |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['precision']} | {r['side']} | {r['steps']} | {r['tokens_per_s']:,.1f} | "
                     f"{r['speed_vs_trainer']:.2f}x | {r['val_loss']:.4f} | {r['val_loss_vs_trainer_pct']:+.2f}% |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
