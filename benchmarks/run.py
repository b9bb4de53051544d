"""The benchmark runner: a matrix of configurations -> memory and throughput, CSV + markdown + PNG charts.

    .venv/bin/python benchmarks/run.py benchmarks/matrices/cpu_gpt2.yaml
    .venv/bin/python benchmarks/run.py benchmarks/matrices/gpu_predict_xl.yaml      # simulate mode

A matrix YAML:

    name: cpu_gpt2                  # results go to benchmarks/results/<name>/
    mode: measure                   # measure (real steps on this device) | simulate (fake tensors)
    kernel: cpu                     # simulate only: cpu | cuda (GPU flash kernels, allocator rounding)
    world_size: 1                   # ranks: simulate partitions ZeRO model states over them; measure runs a
                                    # ZeRO config under the deepspeed launcher with that many ranks (a config
                                    # may set its own with a `world_size=2` entry)
    steps: 3                        # optimizer steps (measure: after 1 warm-up step)
    baseline: true                  # also run the seeds' recipe (HF Trainer, fp32 AdamW, padding=max_length);
                                    # simulate mode simulates that recipe (BASELINE_RECIPE) through the engine's step
    base: [model.init=random, model.name=gpt2, data.block_size=256, train.micro_batch_size=2]
    configs:                        # named override lists, each on top of `base`
      fp32-adamw: []
      checkpointing: [memory.activation_checkpointing=true]
      t4-recipe: [recipe=adamw_8bit_inb, memory.precision=fp16]
                                    # recipe=KEY (in configs or base): that recipe's overrides from the
                                    # catalog (engine/recipes.py), in its place
    axes:                           # optional: a cross product, each key -> list of values
      optim.name: [adamw, adamw_8bit]

Each configuration runs in its own subprocess (so a crash or out-of-memory is recorded as such and the
run goes on, and peak RSS is per configuration).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.devices import cpu_name  # noqa: E402
from engine.recipes import CATALOG  # noqa: E402

MIB = 2**20
CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporaries", "other")
# The seeds' recipe as engine settings, for simulating it (the catalog's hf_trainer): fp32, torch AdamW (fused: the
# HF Trainer default), clipping at 1.0 (its default), HF's unfused GELU, no checkpointing, no 8-bit states, no
# chunked loss. Padding to max_length changes how many tokens are useful, not memory at a fixed length. Checked
# against the measured HF Trainer run by validate_simulation.py.
BASELINE_RECIPE = list(CATALOG["hf_trainer"].overrides)
BASELINE_NAME = "baseline (HF Trainer recipe)"


def with_recipes(overrides: list[str]) -> list[str]:
    """Each `recipe=KEY` entry replaced, in its place, by that catalog recipe's overrides (engine/recipes.py)."""
    out: list[str] = []
    for item in overrides:
        if not item.startswith("recipe="):
            out.append(item)
            continue
        key = item.split("=", 1)[1]
        if key not in CATALOG:
            raise SystemExit(f"error: {item}: no such recipe in engine/recipes.py (known: {', '.join(CATALOG)})")
        out += CATALOG[key].overrides
    return out


def expand(matrix: dict, set_overrides: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """(name, overrides) for every configuration of the matrix; `set_overrides` go on top of `base`; `recipe=KEY`
    entries become that recipe's overrides."""
    base = with_recipes(list(matrix.get("base", [])) + list(set_overrides or []))
    jobs = [(name, base + with_recipes(list(ov or []))) for name, ov in (matrix.get("configs") or {}).items()]
    axes = matrix.get("axes") or {}
    if axes:
        keys = list(axes)
        for values in itertools.product(*(axes[k] for k in keys)):
            ov = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in zip(keys, values)]
            jobs.append((",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, values)), base + ov))
    if not jobs:
        raise SystemExit("error: the matrix has no configs and no axes")
    if matrix.get("baseline") and matrix.get("mode") == "simulate":
        jobs.insert(0, (BASELINE_NAME, base + BASELINE_RECIPE))
    return jobs


def split_world(overrides: list[str], default: int) -> tuple[list[str], int]:
    """Pull a config's own `world_size=N` entry out of its overrides."""
    world = [int(o.split("=", 1)[1]) for o in overrides if o.startswith("world_size=")]
    return [o for o in overrides if not o.startswith("world_size=")], (world[-1] if world else default)


# ----------------------------------------------------------------------------- one configuration (subprocess)


def run_one(name: str, overrides: list[str], mode: str, kernel: str, steps: int, world_size: int = 1) -> dict:
    from engine.config import load_config

    overrides, world_size = split_world(overrides, world_size)
    cfg = load_config(None, overrides)
    row = {"name": name, "mode": mode, "model": cfg.model.name, "seq": cfg.data.block_size,
           "micro_batch": cfg.train.micro_batch_size, "zero_stage": cfg.memory.zero_stage,
           "precision": cfg.memory.precision, "optimizer": cfg.optim.name,
           "checkpointing": cfg.memory.activation_checkpointing, "lora": cfg.memory.lora.enabled,
           "in_backward": cfg.memory.optimizer_in_backward, "loss_chunk": cfg.memory.loss_chunk_size}
    if mode == "simulate":
        from engine.memory.simulate import simulate

        sim = simulate(cfg, kernel=kernel, steps=2, zero_world=world_size)
        if kernel == "cuda":
            from engine.memory.gpus import smallest_class

            row["with_gpu_margin_mib"] = sim.with_gpu_margin() / MIB
            row["smallest_gpu"] = smallest_class(sim.with_gpu_margin()) or "> 80 GB"
        row.update(world_size=world_size, kernel=f"{kernel} ({'flash SDPA stand-in' if kernel == 'cuda' else 'this CPU'})",
                   peak_mib=sim.peak_bytes / MIB, seconds=sim.seconds,
                   host_offload_mib=(sim.zero or {}).get("host", 0) / MIB,
                   **{f"{c}_mib": sim.breakdown.get(c, 0) / MIB for c in CATEGORIES})
        return row
    if world_size > 1 or cfg.memory.zero_stage > 0:
        row.update(run_distributed(overrides, steps, world_size), world_size=world_size)
        return row
    from engine.memory.measure import measure

    m = measure(cfg, steps=steps, warmup=1)
    tracked = not cfg.train.compile_blocks  # compiled kernels are invisible to the tracker: peak RSS only
    row.update(kernel="measured", peak_mib=m.peak_bytes / MIB if tracked else None, peak_rss_mib=m.peak_rss_bytes / MIB,
               step_seconds=m.step_seconds, tokens_per_s=m.tokens_per_s, useful_tokens_per_s=m.tokens_per_s,
               mfu=m.mfu, **{f"{c}_mib": m.breakdown.get(c, 0) / MIB for c in CATEGORIES})
    return row


def run_distributed(overrides: list[str], steps: int, world_size: int) -> dict:
    """A DeepSpeed configuration measured for real: `engine train` under the deepspeed launcher with
    `logging.track_memory` (rank 0's tracked peak by category), 1 warm-up step + `steps` timed steps."""
    import os
    import shutil
    import tempfile

    from engine.backends.deepspeed_backend import free_port
    from engine.config import config_to_yaml, load_config

    out = Path(tempfile.mkdtemp(prefix="bench_ds_"))
    # The same resolved configuration the single-device rows use (schema defaults + overrides), not the CLI's preset.
    (out / "config.yaml").write_text(config_to_yaml(load_config(None, overrides)))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world_size), "--master_port", str(free_port()),
           str(ROOT / "launch" / "train.py"), "--config", str(out / "config.yaml"), f"logging.output_dir={out / 'run'}",
           "logging.track_memory=true",
           "logging.overwrite=true", "logging.progress=false", "logging.log_every=1", f"train.max_steps={steps + 1}",
           "eval.every_n_steps=0", "eval.at_end=false", "sample.max_new_tokens=0"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if r.returncode != 0:
            raise RuntimeError((r.stderr.strip().splitlines() or r.stdout.strip().splitlines() or ["failed"])[-1])
        summary = json.loads((out / "run" / "summary.json").read_text())
        recs = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        tps = sorted(r["tokens_per_s"] for r in recs if "tokens_per_s" in r and r["step"] > 1)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    tracked = summary["tracked_memory"]
    median = tps[len(tps) // 2] if tps else None
    return {"kernel": "measured (rank 0)", "peak_mib": tracked["peak_mib"], "peak_rss_mib": summary.get("peak_mem_mib"),
            "tokens_per_s": median, "useful_tokens_per_s": median, "step_seconds": None, "mfu": None,
            **{f"{c}_mib": tracked.get(f"{c}_mib", 0) for c in CATEGORIES}}


def run_baseline(overrides: list[str], steps: int) -> dict:
    """The seeds' recipe: HF Trainer, fp32 AdamW, line by line with padding='max_length', no checkpointing."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from engine.config import load_config
    from engine.data import SAMPLE_CORPUS, read_documents
    from engine.tokenizer import load_tokenizer
    from engine.memory.meter import peak_rss_bytes
    from engine.memory.tracker import MemoryTracker
    from engine.model import random_config

    cfg = load_config(None, overrides)
    seq, micro = cfg.data.block_size, cfg.train.micro_batch_size
    tok = load_tokenizer(cfg.model)
    docs = read_documents(SAMPLE_CORPUS["train"])[: micro * (steps + 1)]
    enc = tok(docs, padding="max_length", truncation=True, max_length=seq)
    ds = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    useful = sum(sum(m) for m in enc["attention_mask"][micro:])  # non-pad tokens after the warm-up step
    torch.manual_seed(0)
    mcfg = random_config(cfg)
    mcfg._attn_implementation = cfg.model.attn_implementation
    model = AutoModelForCausalLM.from_config(mcfg)
    args = TrainingArguments(output_dir=str(ROOT / "benchmarks/results/.baseline_tmp"), per_device_train_batch_size=micro,
                             max_steps=steps + 1, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=not torch.cuda.is_available(), learning_rate=5e-5, disable_tqdm=True,
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    times: list[float] = []

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    trainer.add_callback(Clock())
    tracker = MemoryTracker()
    tracker.track_model(model)
    with tracker:
        trainer.train()
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    total_s = sum(times[1:])
    return {"name": "baseline (HF Trainer)", "mode": "measure", "kernel": "measured",
            "model": cfg.model.name, "seq": seq, "micro_batch": micro, "zero_stage": 0, "precision": "fp32",
            "optimizer": "adamw", "checkpointing": False, "lora": False, "in_backward": False, "loss_chunk": None,
            "peak_mib": tracker.peak / MIB, "peak_rss_mib": peak_rss_bytes() / MIB, "step_seconds": step_s,
            "tokens_per_s": micro * seq / step_s, "useful_tokens_per_s": useful / total_s, "mfu": None,
            **{f"{c}_mib": tracker.peak_breakdown.get(c, 0) / MIB for c in CATEGORIES}}


# ----------------------------------------------------------------------------- reports


def write_reports(rows: list[dict], out: Path, matrix: dict, env: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    base = next((r for r in rows if r["name"].startswith("baseline") and "peak_mib" in r), None)
    for r in rows:
        if base and r.get("peak_mib") is not None:
            r["memory_vs_baseline"] = r["peak_mib"] / base["peak_mib"]
            if r.get("useful_tokens_per_s") and base.get("useful_tokens_per_s"):
                r["useful_tps_vs_baseline"] = r["useful_tokens_per_s"] / base["useful_tokens_per_s"]
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (out / "env.json").write_text(json.dumps(env, indent=2))
    measured = matrix.get("mode", "measure") == "measure"
    head = ["config", "peak MiB", *[c for c in CATEGORIES if c != "other"]]
    if measured:
        head += ["peak RSS MiB", "tokens/s", "useful tok/s", "MFU"]
    gpu = not measured and matrix.get("kernel") == "cuda"
    if not measured:
        head += ["ranks", "offloaded to host MiB"]
    if gpu:
        head += ["+ GPU margin MiB", "smallest GPU"]
    if base:
        head += ["memory vs baseline"] + (["useful tok/s vs baseline"] if measured else [])
    lines = [f"# {matrix.get('name')}: {'measured on ' + env['device'] if measured else 'SIMULATED (' + matrix.get('kernel', 'cpu') + ' kernels)'}",
             "", f"Command: `{env['command']}`. torch {env['torch']}, transformers {env['transformers']}, "
             f"deepspeed {env['deepspeed']}. MiB = 2^20 bytes. Categories are at the moment of the peak.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(v, nd=0):
        return "" if v is None else (f"{v:,.{nd}f}" if isinstance(v, (int, float)) else str(v))

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | **{r['error']}** |" + " |" * (len(head) - 2))
            continue
        cells = [r["name"], fmt(r["peak_mib"])] + [fmt(r.get(f"{c}_mib")) for c in CATEGORIES if c != "other"]
        if measured:
            cells += [fmt(r.get("peak_rss_mib")), fmt(r.get("tokens_per_s"), 1), fmt(r.get("useful_tokens_per_s"), 1),
                      fmt(r.get("mfu"), 3)]
        if not measured:
            cells += [fmt(r.get("world_size")), fmt(r.get("host_offload_mib"))]
        if gpu:
            cells += [fmt(r.get("with_gpu_margin_mib")), r.get("smallest_gpu", "")]
        if base:
            cells += [fmt(r.get("memory_vs_baseline"), 2) + "x" if r.get("memory_vs_baseline") else ""]
            if measured:
                cells += [fmt(r.get("useful_tps_vs_baseline"), 2) + "x" if r.get("useful_tps_vs_baseline") else ""]
        lines.append("| " + " | ".join(cells) + " |")
    if gpu:
        lines += ["", "Simulated: fake tensors through the engine's own step, CUDA flash-attention stand-in, 512-byte "
                  "allocator rounding. '+ GPU margin' adds 512 MiB + 5% for the CUDA context, workspaces and "
                  "fragmentation, which the simulation does not see (docs/MEMORY.md). 'smallest GPU': the smallest "
                  "class whose card's total memory (nvidia-smi) holds that figure: 8 GB = 8,192 MiB, 16 GB = T4 "
                  "15,360 MiB, 24 GB = A10G 23,028 MiB, 40 GB = A100 40,960 MiB, 80 GB = H100 81,559 MiB."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows, out, matrix, measured)


def plot(rows: list[dict], out: Path, matrix: dict, measured: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("peak_mib") is not None]  # (compiled rows: not tracked, no breakdown)
    tp = [r for r in rows if "error" not in r and r.get("useful_tokens_per_s")]
    if not ok:
        plot_throughput(tp, out, matrix)
        return
    names = [r["name"] for r in ok]
    gib = max(r["peak_mib"] for r in ok) >= 2048
    unit, div = ("GiB", 1024) if gib else ("MiB", 1)
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(ok) + 3), 5))
    bottom = [0.0] * len(ok)
    colors = dict(zip(CATEGORIES, ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")))
    for c in CATEGORIES:
        vals = [r.get(f"{c}_mib", 0) / div for r in ok]
        if any(vals):
            ax.bar(names, vals, bottom=bottom, label=c, color=colors[c])
            bottom = [b + v for b, v in zip(bottom, vals)]
    for i, r in enumerate(ok):
        ax.text(i, bottom[i], f"{r['peak_mib'] / div:,.{2 if gib else 0}f}", ha="center", va="bottom", fontsize=8)
    how = "measured" if measured else f"simulated, {matrix.get('kernel', 'cpu')} kernels"
    ax.set_title(f"{matrix.get('name')}: peak memory by category ({how})", fontsize=10)
    ax.set_ylabel(f"{unit} at the peak (per rank)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    plt.xticks(rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)
    plt.close(fig)
    plot_throughput(tp, out, matrix)


def plot_throughput(tp: list[dict], out: Path, matrix: dict) -> None:
    import matplotlib.pyplot as plt

    if tp:
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(tp) + 2), 4.5))
        ax.bar([r["name"] for r in tp], [r["useful_tokens_per_s"] for r in tp], color="#4C72B0")
        ax.set_title(f"{matrix.get('name')}: useful (non-padding) tokens per second, measured", fontsize=10)
        ax.set_ylabel("tokens / s")
        plt.xticks(rotation=30, ha="right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=120)
        plt.close(fig)


def environment(argv: list[str]) -> dict:
    import deepspeed
    import torch
    import transformers

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)"
    return {"device": dev, "torch": torch.__version__, "transformers": transformers.__version__,
            "deepspeed": deepspeed.__version__, "python": platform.python_version(),
            "command": " ".join([".venv/bin/python", "benchmarks/run.py", *argv]), "date": time.strftime("%Y-%m-%d")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("matrix", nargs="?")
    ap.add_argument("--out", help="default: benchmarks/results/<matrix name>")
    ap.add_argument("--name", help="results name (default: the matrix's `name`)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides on top of the matrix's base, e.g. --set model.name=gpt2-large")
    ap.add_argument("--mode", choices=["measure", "simulate"], help="override the matrix's mode")
    ap.add_argument("--kernel", choices=["cpu", "cuda"], help="override the matrix's simulation kernels")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        job = json.loads(args.one)
        if job["name"] == "__baseline__":
            row = run_baseline(job["overrides"], job["steps"])
        else:
            row = run_one(job["name"], job["overrides"], job["mode"], job["kernel"], job["steps"], job.get("world_size", 1))
        print("ROW " + json.dumps(row))
        return 0
    if not args.matrix:
        ap.error("a matrix YAML is required")
    matrix = yaml.safe_load(Path(args.matrix).read_text())
    for key in ("name", "mode", "kernel"):
        if getattr(args, key):
            matrix[key] = getattr(args, key)
    mode, kernel, steps = matrix.get("mode", "measure"), matrix.get("kernel", "cpu"), int(matrix.get("steps", 3))
    world = int(matrix.get("world_size", 1))  # simulate: ZeRO partitions over this many ranks
    jobs = [{"name": n, "overrides": ov, "mode": mode, "kernel": kernel, "steps": steps, "world_size": world}
            for n, ov in expand(matrix, args.set)]
    if matrix.get("baseline") and mode == "measure":
        jobs.insert(0, {"name": "__baseline__", "overrides": with_recipes(list(matrix.get("base", [])) + args.set),
                        "steps": steps})
    from tqdm import tqdm

    rows = []
    for job in tqdm(jobs, desc=matrix.get("name", "bench"), unit="config"):
        r = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)], capture_output=True, text=True, cwd=ROOT)
        line = next((l for l in reversed(r.stdout.splitlines()) if l.startswith("ROW ")), None)
        if r.returncode == 0 and line:
            rows.append(json.loads(line[4:]))
        else:
            err = (r.stderr.strip().splitlines() or ["failed"])[-1][:160]
            if r.returncode in (-9, 137) or "out of memory" in r.stderr.lower() or "MemoryError" in r.stderr:
                err = f"out of memory ({err})"
            rows.append({"name": job["name"], "error": err})
        r = rows[-1]
        tqdm.write(f"{r['name']}: " + (r["error"] if "error" in r else f"peak {r['peak_mib']:,.0f} MiB"
                                       if r.get("peak_mib") is not None else f"peak RSS {r['peak_rss_mib']:,.0f} MiB"))
    out = Path(args.out or ROOT / "benchmarks/results" / matrix.get("name", "bench"))
    write_reports(rows, out, matrix, environment(argv))
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
