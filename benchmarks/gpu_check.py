"""The GPU truth kit: every GPU claim of the engine checked on a real GPU, in one command, in under 8 minutes.

On a CUDA machine (no network needed; `scripts/gpu_wheels.sh` fills .gpu_wheels/ with the wheels it lacks):

    bash benchmarks/gpu_check.sh            # installs .gpu_wheels/ into a temporary target, then runs this file

It does, writing results after every configuration (a stopped run leaves what it measured):
1. recipes: for gpt2-large and gpt2-xl (random init), a few real optimizer steps of each key recipe (the T4
   preset, the LoRA preset, AdamW8bit + checkpointing, plain AdamW in the GPU's 16-bit precision and in fp16,
   ZeRO-2 and ZeRO-3 on one rank through DeepSpeed), each in its own process: torch.cuda.max_memory_allocated,
   max_memory_reserved, the device-level use from mem_get_info (nvidia-smi's view, CUDA context included),
   tokens/s and MFU (against this GPU's measured matmul peak in the same dtype); beside each the simulator's
   prediction (CUDA kernels) raw and with the margin, and the errors;
2. the planner's verdicts under emulated budgets (torch.cuda.set_per_process_memory_fraction): the configuration it
   recommends for a 16 GB T4 (gpt2-xl) and an 8 GB card (gpt2-large) must run; the closest one it says does not fit
   should run out of memory (reported either way);
3. the margin: the CUDA context and reserved-minus-allocated, per configuration and in summary;
4. `pytest -m gpu` (tests/test_gpu.py: CUDA-only checks, skipped without a GPU);
5. results.csv, results.md and env.json (GPU, driver, library versions) in benchmarks/results/gpu_check/<gpu>/.

`--dry` runs the same flow on the CPU with a tiny model (the test suite does, so the kit cannot rot).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine.config import load_config, resolve_config_path  # noqa: E402
from engine.recipes import checkpointing, optimizer, precision, recipe, zero  # noqa: E402

MIB = 2**20
RESULT = "RESULT "  # a child's last stdout line: RESULT {json}
TINY = ["model.n_layer=2", "model.n_embd=64", "model.n_head=2", "model.n_positions=128", "data.block_size=64"]

# name -> (preset or None, overrides); every recipe runs at sequence 1024 (64 in --dry), random init. The settings
# come from the recipe catalog (engine/recipes.py); the presets hold its recipes (tests/test_recipes.py checks
# which). Most telling first: a run cut short by the time budget keeps the headline recipes.
RECIPES = {
    "t4 preset": ("gpt2-xl_full_t4", []),  # adamw_8bit_inb (fp32 weights, 8-bit AdamW in backward)
    "8gb preset": ("gpt2-xl_full_8gb", []),  # bf16_8bit: bf16 weights (fp16 compute without bf16)
    "qlora preset": ("gpt2-xl_qlora_4gb", ["train.global_batch_size=null"]),  # qlora; one micro-batch a step
    "adafactor bf16 weights": ("gpt2-xl_full_8gb", [*optimizer("adafactor")]),  # = bf16_adafactor
    "adamw": (None, [*recipe("adamw").overrides]),
    "adamw8bit+ckpt": (None, [*recipe("adamw_8bit").overrides, *checkpointing()]),
    "lora preset": ("gpt2-large_lora_8gb", []),  # lora
    "adamw fp16": (None, [*recipe("adamw").overrides, *precision("fp16")]),
    "zero2 1 rank": (None, [*zero(2)]),
    "zero3 1 rank": (None, [*zero(3)]),
    # the speed options on the T4 recipe (its checkpointing made selective; its blocks compiled): what they cost in
    # memory and buy in speed on a GPU (the compiled rows' first step compiles; measured steps come after it)
    "t4 preset, selective recompute": ("gpt2-xl_full_t4", ["memory.checkpoint_policy=selective"]),
    "t4 preset, compiled blocks": ("gpt2-xl_full_t4", ["train.compile_blocks=true"]),
    "t4 preset, selective + compiled": ("gpt2-xl_full_t4", ["memory.checkpoint_policy=selective",
                                                            "train.compile_blocks=true"]),
    # the head's loss and gradient in one pass (memory.fused_head_loss) against "adamw" above: its GPU memory and
    # speed, simulated but not measured there yet (a bf16 GPU: under fp16 the head keeps autograd's path)
    "adamw, fused head loss": (None, [*recipe("adamw").overrides, "memory.fused_head_loss=true"]),
}


def recipe_config(model: str, recipe: str, dry: bool, extra: list[str] | None = None):
    """One recipe's config for `model` (random init; `extra` overrides last)."""
    preset, overrides = RECIPES[recipe]
    paths = [resolve_config_path(preset)] if preset else None
    base = [f"model.name={model}", "model.init=random", "data.block_size=1024", "train.micro_batch_size=1",
            "train.preflight=false", "logging.progress=false"]
    if preset:
        base.remove("train.micro_batch_size=1")  # the preset's own batch
    if dry:
        # the CPU: fp32, except bf16-weight recipes, which need 16-bit compute (bf16 runs on any CPU, if slowly)
        precision = "bf16" if preset == "gpt2-xl_full_8gb" else "fp32"
        base += TINY + ["train.device=cpu"] + ([f"memory.precision={precision}"]
                                                if "precision" not in " ".join(overrides) else [])
    return load_config(paths, base + overrides + (extra or []))


# ----------------------------------------------------------------------------- one configuration (a child process)


def run_child(spec: dict) -> dict:
    """Measure one configuration: `measure()` (the engine's own backends), under a memory fraction if given."""
    from engine.memory.measure import measure

    cuda = torch.cuda.is_available() and not spec.get("dry")
    context = cuda_context_bytes() if cuda else None
    if cuda and spec.get("budget_mib"):
        # An emulated card: what the caching allocator may take is the card's memory less this process's context.
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(max(0.01, (spec["budget_mib"] * MIB - context) / total))
    cfg = load_config(None, spec["overrides"]) if spec.get("overrides") else recipe_config(
        spec["model"], spec["recipe"], spec.get("dry", False))
    try:
        m = measure(cfg, steps=spec.get("steps", 2), warmup=1, track=not cuda)
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError, or a library's own "CUDA out of memory" error
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "out of memory" not in str(e).lower():
            raise
        return {"oom": True, "error": str(e).splitlines()[0][:300], "context": context}
    return {"oom": False, "precision": m.precision, "allocated": m.cuda_allocated if cuda else m.peak_bytes,
            "reserved": m.cuda_reserved, "device_used": m.cuda_device_used, "context": context,
            "tokens_per_s": m.tokens_per_s, "mfu": m.mfu, "step_seconds": m.step_seconds, "params": m.params["total"],
            "trainable": m.params["trainable"], "matmul_peak_tflops": m.matmul_peak_flops / 1e12}


def child(spec: dict, timeout: float) -> dict:
    """`run_child` in a fresh process (a clean allocator, no DeepSpeed state left from the previous run)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    line = next((l for l in reversed(r.stdout.splitlines()) if l.startswith(RESULT)), None)
    if line is None:
        return {"error": (r.stderr.strip().splitlines() or ["no result"])[-1][:300]}
    return json.loads(line[len(RESULT):])


# ----------------------------------------------------------------------------- predictions (CPU, in a pool)


def no_gpu() -> None:
    """Pool workers simulate on the CPU and must hold no CUDA context (it would count in the GPU's measured use);
    their libraries' notices stay out of the kit's output."""
    import logging
    import warnings

    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def predict(args: tuple) -> dict:
    """The simulator's prediction for one recipe (`auto` precision: the GPU's, resolved by the caller)."""
    model, recipe, dry, kernel, auto_precision = args
    from engine.memory.simulate import simulate_deep

    cfg = recipe_config(model, recipe, dry)
    if cfg.memory.precision == "auto":
        cfg = cfg.updated({"memory.precision": auto_precision})
    sim = simulate_deep(cfg, kernel=kernel)
    return {"predicted": sim.peak_bytes, "predicted_margin": sim.with_gpu_margin(), "sim_seconds": sim.seconds}


def plan_budget(name: str, model: str, mib: int, lora: bool, dry: bool, bf16: bool) -> dict:
    """`engine plan` for a card of `mib` MiB: the recommended configuration and the closest one that does not fit."""
    from engine.memory.gpus import GPU
    from engine.plan import Request, config_overrides, plan, recommend, verify

    req = Request(model=model, gpu=GPU(name, mib, bf16=bf16, peak_tflops=65), seq_len=32 if dry else 1024, lora=lora,
                  max_micro=4 if dry else 64)
    rows, _ = plan(req, workers=1 if dry else min(8, os.cpu_count() or 1))
    chosen = recommend(rows, lambda row: verify(req, row))  # what `engine plan` recommends
    closest = None
    if chosen is not None:
        # The sharpest test of the margin: the recommended configuration one micro-batch step up, which the plan
        # rejected (simulated directly, as the recommendation itself is).
        up = verify(req, replace(chosen, micro=chosen.micro * 2, fits=True, reason=""))
        closest = up if not up.fits else None
    if closest is None:  # else the candidate that misses the budget by the least
        over = [r for r in rows if not r.fits and r.micro and "host" not in r.reason]
        closest = min(over, key=lambda r: r.gpu_bytes, default=None)

    def spec(row):
        ov = config_overrides(req, row.strategy, row.activations, row.micro, row.accum) + [
            "model.init=random", "train.preflight=false", "logging.progress=false"]
        return {"config": row.name.replace("|", "/"), "micro": row.micro, "predicted_margin": row.gpu_bytes,
                "overrides": ov + (TINY[:-1] + ["train.device=cpu"] if dry else [])}

    return {"budget": name, "model": model, "mib": mib, "lora": lora,
            "recommended": spec(chosen) if chosen else None, "not_fitting": spec(closest) if closest else None}


# ----------------------------------------------------------------------------- the environment and the margin


def environment(dry: bool) -> dict:
    """Versions and the GPU, read without a CUDA context in this process (nvidia-smi): the parent holds none, so
    each measured child sees only its own context in the device's use."""
    import importlib.metadata as md

    env = {"python": platform.python_version(), "machine": platform.machine(), "dry": dry, "cuda": torch.version.cuda}
    for pkg in ("torch", "transformers", "deepspeed", "bitsandbytes", "peft", "pydantic", "datasets"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    if dry:
        return {**env, "gpu": "dry run (CPU)", "cpu": platform.processor() or platform.machine()}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30).stdout
        name, total, driver, cap = [x.strip() for x in q.splitlines()[0].split(",")]
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        # No usable nvidia-smi: ask torch (this process then holds a CUDA context, counted in the children's device
        # use; the rows say so through env.json's parent_context).
        p = torch.cuda.get_device_properties(0)
        name, total, driver, cap = p.name, p.total_memory / MIB, None, f"{p.major}.{p.minor}"
        env["parent_context"] = True
    return {**env, "gpu": name, "gpu_total_mib": float(total), "driver": driver, "compute_capability": cap,
            "bf16": float(cap) >= 8.0}


def cuda_context_bytes() -> int:
    """Device memory in use that the caching allocator does not hold: the CUDA context and library handles, measured
    after a cuBLAS matmul so its workspace exists (what every process pays before its first tensor)."""
    a = torch.ones(256, 256, device="cuda")
    (a @ a).sum().item()
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()  # also any other process's use: the kit's parent has none


# ----------------------------------------------------------------------------- results


class Results:
    """Rows written out after every configuration: results.csv, results.md, env.json (a stopped run keeps them)."""

    COLUMNS = ["section", "model", "config", "precision", "status", "allocated_mib", "reserved_mib", "device_used_mib",
               "context_mib",
               "predicted_mib", "error_raw", "predicted_margin_mib", "error_margin", "overhead_mib", "tokens_per_s",
               "mfu", "note"]

    def __init__(self, out: Path, env: dict):
        self.out, self.env, self.rows, self.tests = out, env, [], None
        out.mkdir(parents=True, exist_ok=True)
        self.write()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.write()
        print(" | ".join(f"{row.get(k)}" for k in ("section", "model", "config", "status", "allocated_mib",
                                                  "predicted_mib", "error_raw")), flush=True)

    def write(self) -> None:
        with open(self.out / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, self.COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.rows)
        (self.out / "env.json").write_text(json.dumps({**self.env, "margin": margin_summary(self.rows),
                                                       "tests": self.tests}, indent=2))
        (self.out / "results.md").write_text(markdown(self.env, self.rows, self.tests))


def fmt(v, spec: str = ".0f") -> str:
    return "-" if v is None or v == "" else format(v, spec) if isinstance(v, (int, float)) else str(v)


def markdown(env: dict, rows: list[dict], tests: dict | None) -> str:
    head = (f"# GPU check: {env.get('gpu')}\n\n{env.get('gpu_total_mib', 0):,.0f} MiB, driver {env.get('driver')}, "
            f"CUDA {env.get('cuda')}, torch {env.get('torch')}, transformers {env.get('transformers')}, deepspeed "
            f"{env.get('deepspeed')}, bitsandbytes {env.get('bitsandbytes')}.\n\nallocated = torch.cuda.max_memory_allocated; device = total - free "
            "after the steps (nvidia-smi's view); predicted = simulated peak (CUDA kernels), raw and + margin "
            "(512 MiB + 5%); error = predicted / measured - 1 (raw vs allocated, with margin vs device).\n\n")
    lines = ["| section | model | config | precision | status | allocated MiB | reserved MiB | device MiB | "
             "predicted MiB | error | + margin MiB | error | tokens/s | MFU | note |", "|" + "---|" * 15]
    for r in rows:
        lines.append("| " + " | ".join([r["section"], r["model"], r["config"], fmt(r.get("precision")), r["status"],
                                        fmt(r.get("allocated_mib")), fmt(r.get("reserved_mib")),
                                        fmt(r.get("device_used_mib")), fmt(r.get("predicted_mib")),
                                        fmt(r.get("error_raw"), "+.1%"), fmt(r.get("predicted_margin_mib")),
                                        fmt(r.get("error_margin"), "+.1%"), fmt(r.get("tokens_per_s"), ",.0f"),
                                        fmt(r.get("mfu"), ".1%"), r.get("note", "")]) + " |")
    m = margin_summary(rows)
    tail = [f"\nMargin: {json.dumps(m)}" if m else "", f"\n`pytest -m gpu`: {tests}" if tests else ""]
    return head + "\n".join(lines) + "\n" + "\n".join(t for t in tail if t) + "\n"


def margin_summary(rows: list[dict]) -> dict | None:
    """What the margin really is: device use above the allocator's peak (context + cached blocks), as MiB and as a
    fraction of the allocated peak, worst case over the measured recipes."""
    measured = [r for r in rows if r["section"] == "recipe" and r.get("overhead_mib") is not None]
    if not measured:
        return None
    frac = [(r["reserved_mib"] - r["allocated_mib"]) / r["allocated_mib"] for r in measured]
    return {"context_mib": max(r["context_mib"] for r in measured),
            "max_overhead_mib": max(r["overhead_mib"] for r in measured),
            "max_reserved_over_allocated": max(frac), "configs": len(measured)}


def recipe_row(model: str, recipe: str, got: dict, pred: dict | None) -> dict:
    row = {"section": "recipe", "model": model, "config": recipe, "precision": got.get("precision"),
           "status": "error" if "error" in got else "oom" if got.get("oom") else "ran", "note": got.get("error", "")}
    if row["status"] == "ran":
        context_mib = (got.get("context") or 0) / MIB
        row.update(allocated_mib=got["allocated"] / MIB, tokens_per_s=got["tokens_per_s"], mfu=got["mfu"])
        if got.get("reserved") is not None:
            row.update(reserved_mib=got["reserved"] / MIB, device_used_mib=got["device_used"] / MIB,
                       context_mib=context_mib, overhead_mib=context_mib + (got["reserved"] - got["allocated"]) / MIB)
        if pred:
            row.update(predicted_mib=pred["predicted"] / MIB, predicted_margin_mib=pred["predicted_margin"] / MIB,
                       error_raw=pred["predicted"] / got["allocated"] - 1)
            device = (got["reserved"] / MIB + context_mib) if got.get("reserved") is not None else None
            if device:
                row["error_margin"] = row["predicted_margin_mib"] / device - 1
    return row


# ----------------------------------------------------------------------------- the kit


def run_kit(args) -> int:
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    env = environment(args.dry)
    gpu = re.sub(r"[^A-Za-z0-9._-]+", "_", env["gpu"]).strip("_")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "gpu_check" / gpu
    results = Results(out, env)
    kernel = "cpu" if args.dry else "cuda"
    models = args.models or (["gpt2"] if args.dry else ["gpt2-xl", "gpt2-large"])
    recipes = args.recipes or list(RECIPES)
    bf16 = bool(env.get("bf16"))
    auto = "fp32" if args.dry else "bf16" if bf16 else "fp16"  # what memory.precision=auto gives on this GPU
    pool = ProcessPoolExecutor(max(1, min(args.workers, os.cpu_count() or 1)), mp_context=get_context("spawn"),
                               initializer=no_gpu)
    try:
        # CPU work (simulations, plans) runs in the pool while the GPU measures.
        preds = {(m, r): pool.submit(predict, (m, r, args.dry, kernel, auto)) for m in models for r in recipes}
        budgets = [("16 GB T4", "gpt2-xl", 15_360, False, False), ("8 GB card", "gpt2-large", 8_192, False, bf16)]
        if args.dry:
            budgets = [("dry 900 MiB", "distilgpt2", 900, True, False)]
        plans = [pool.submit(plan_budget, n, m, mib, lora, args.dry, b16) for n, m, mib, lora, b16 in budgets]
        for m in models:
            for r in recipes:
                if time.perf_counter() > deadline:
                    results.add({"section": "recipe", "model": m, "config": r, "status": "skipped",
                                 "note": "time budget spent"})
                    continue
                got = child({"model": m, "recipe": r, "dry": args.dry}, timeout=args.per_config_s)
                try:
                    pred = preds[(m, r)].result(timeout=max(1.0, deadline - time.perf_counter()))
                except Exception as e:  # a prediction that failed is reported, the measurement kept
                    pred, got = None, {**got, "error": got.get("error") or f"prediction failed: {e}"}
                results.add(recipe_row(m, r, got, pred))
        for fut in plans:
            run_budget(fut, results, env, args, deadline)
    finally:
        pool.shutdown(cancel_futures=True)
    results.tests = run_gpu_tests(args, deadline)
    results.write()
    print(f"gpu_check: {len(results.rows)} rows in {time.perf_counter() - t0:.0f} s -> {out}", flush=True)
    return 0


def run_budget(fut, results: Results, env: dict, args, deadline: float) -> None:
    try:
        p = fut.result(timeout=max(1.0, deadline - time.perf_counter()))
    except Exception as e:
        results.add({"section": "budget", "model": "-", "config": "plan", "status": "error", "note": str(e)[:300]})
        return
    for kind, expect in (("recommended", "runs"), ("not_fitting", "runs out of memory")):
        spec = p[kind]
        if spec is None:
            results.add({"section": "budget", "model": p["model"], "config": f"{p['budget']}: no {kind} configuration",
                         "status": "none"})
            continue
        if time.perf_counter() > deadline:
            results.add({"section": "budget", "model": p["model"], "config": spec["config"], "status": "skipped",
                         "note": "time budget spent"})
            continue
        got = child({"overrides": spec["overrides"], "budget_mib": p["mib"], "dry": args.dry, "steps": 1},
                    timeout=args.per_config_s)
        status = "error" if "error" in got else "oom" if got.get("oom") else "ran"
        verdict = (status == "ran") == (expect == "runs")
        results.add({"section": "budget", "model": p["model"], "config": f"{p['budget']} {kind}: {spec['config']} "
                     f"(micro {spec['micro']})", "precision": got.get("precision"), "status": status,
                     "allocated_mib": got["allocated"] / MIB if got.get("allocated") else None,
                     "predicted_margin_mib": spec["predicted_margin"] / MIB,
                     "note": (f"expected: {expect}; " + ("as predicted" if verdict else "NOT as predicted")
                              + ("; no memory limit on CPU (dry)" if args.dry else "")
                              + (f"; {got['error']}" if "error" in got else ""))})


def run_gpu_tests(args, deadline: float) -> dict:
    """`pytest -m gpu` (CUDA-only checks); in --dry only collected (they skip without a GPU)."""
    left = deadline - time.perf_counter()
    if left < 30:
        return {"status": "skipped", "note": "time budget spent"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    if args.dry:
        cmd.append("--collect-only")
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired:
        return {"status": "timed out"}
    tail = [l for l in r.stdout.splitlines() if l.strip()][-1:] or ["no output"]
    return {"status": "passed" if r.returncode == 0 else f"exit {r.returncode}", "summary": tail[0],
            "output_tail": r.stdout[-3000:] if r.returncode else ""}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="results folder (default benchmarks/results/gpu_check/<gpu>)")
    p.add_argument("--dry", action="store_true", help="the whole flow on the CPU with a tiny model (no CUDA calls)")
    p.add_argument("--models", nargs="+", help="default: gpt2-large gpt2-xl (--dry: gpt2, tiny)")
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), help="default: all")
    p.add_argument("--budget-s", type=float, default=450, help="stop starting new work after this many seconds")
    p.add_argument("--per-config-s", type=float, default=150, help="limit for one measured configuration")
    p.add_argument("--workers", type=int, default=8, help="CPU processes for the simulations and plans")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(RESULT + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0
    if not args.dry and not torch.cuda.is_available():
        p.error("no CUDA GPU here: run it on a GPU machine, or --dry for the CPU flow")
    return run_kit(args)


if __name__ == "__main__":
    sys.exit(main())
