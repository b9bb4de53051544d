"""Validate the memory simulation against real runs on this CPU (same kernels: kernel="cpu").

For each configuration: `measure()` runs real training steps through the engine's backend with the
memory tracker on real tensors; `simulate()` runs the same step on fake tensors. The table reports
both peaks, the error, the simulation's wall time and the process peak RSS (each configuration in
its own subprocess so RSS is per configuration).

    .venv/bin/python benchmarks/validate_simulation.py            # -> benchmarks/results/simulation_validation/
    .venv/bin/python benchmarks/validate_simulation.py --quick    # tiny models (smoke test)
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASELINE = "baseline-hf-trainer"
# name -> overrides; every one runs on gpt2 and gpt2-medium (random init, dropout 0.1 as released)
CONFIGS: dict[str, list[str]] = {
    "fp32-adamw": [],
    "fp32-adamw-ckpt": ["memory.activation_checkpointing=true"],
    "fp32-adamw-ckpt2": ["memory.activation_checkpointing=true", "memory.checkpoint_every_n_layers=2"],
    "adamw8bit": ["optim.name=adamw_8bit"],
    "adamw8bit-inbwd-ckpt-chunk": ["optim.name=adamw_8bit", "memory.optimizer_in_backward=true", "optim.grad_clip=null",
                                   "memory.activation_checkpointing=true", "memory.loss_chunk_size=256"],
    "lora-r8": ["memory.lora.enabled=true"],
    "freeze-emb-6": ["memory.freeze.embeddings=true", "memory.freeze.first_n_blocks=6"],
    "bf16-autocast-ckpt": ["memory.precision=bf16", "memory.activation_checkpointing=true"],
    "gelu-unfused": ["memory.fused_gelu=false"],
    "accum2-chunk": ["train.grad_accum_steps=2", "memory.loss_chunk_size=128"],
    # measured: the HF Trainer run itself (benchmarks/run.py's baseline); simulated: its recipe through the engine's step
    BASELINE: [],
}


def one(size: str, name: str, seq: int, micro: int, steps: int, quick: bool) -> dict:
    from engine.config import load_config
    from engine.memory.measure import measure
    from engine.memory.simulate import simulate

    base = ["model.init=random", f"model.name={size}", f"data.block_size={seq}", f"train.micro_batch_size={micro}"]
    if quick:
        base += ["model.n_layer=2", "model.n_embd=64", "model.n_head=2"]
    if name == BASELINE:
        from benchmarks.run import BASELINE_RECIPE, run_baseline

        sim = simulate(load_config(None, base + BASELINE_RECIPE), kernel="cpu", steps=steps)
        t = time.perf_counter()
        hf = run_baseline(base, steps - 1)  # its first step is a warm-up: steps in all
        real = SimpleNamespace(peak_bytes=hf["peak_mib"] * 2**20, peak_rss_bytes=hf["peak_rss_mib"] * 2**20,
                               breakdown={c: hf[f"{c}_mib"] * 2**20 for c in sim.breakdown})
    else:
        cfg = load_config(None, base + CONFIGS[name])
        sim = simulate(cfg, kernel="cpu", steps=steps)
        t = time.perf_counter()
        real = measure(cfg, steps=steps, warmup=0)
    return {
        "model": size, "config": name, "seq": seq, "micro_batch": micro,
        "measured_peak_mib": round(real.peak_bytes / 2**20, 1),
        "simulated_peak_mib": round(sim.peak_bytes / 2**20, 1),
        "error_pct": round(100 * (sim.peak_bytes - real.peak_bytes) / real.peak_bytes, 2),
        "sim_seconds": round(sim.seconds, 1), "measure_seconds": round(time.perf_counter() - t, 1),
        "peak_rss_mib": round(real.peak_rss_bytes / 2**20, 1),
        "measured_breakdown_mib": {k: round(v / 2**20, 1) for k, v in real.breakdown.items()},
        "simulated_breakdown_mib": {k: round(v / 2**20, 1) for k, v in sim.breakdown.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/simulation_validation"))
    ap.add_argument("--sizes", default="gpt2,gpt2-medium")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2-layer 64-wide models: a smoke run")
    ap.add_argument("--one", nargs=2, metavar=("SIZE", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.seq, args.micro, args.steps, args.quick)))
        return
    from tqdm import tqdm

    jobs = [(s, c) for s in args.sizes.split(",") for c in args.configs.split(",")]
    rows = []
    for size, name in tqdm(jobs, desc="validate", unit="config"):
        cmd = [sys.executable, __file__, "--one", size, name, "--seq", str(args.seq), "--micro", str(args.micro),
               "--steps", str(args.steps)] + (["--quick"] if args.quick else [])
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            rows.append({"model": size, "config": name, "error": r.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        tqdm.write(f"{size:12s} {name:28s} measured {rows[-1]['measured_peak_mib']:>9} MiB  "
                   f"simulated {rows[-1]['simulated_peak_mib']:>9} MiB  error {rows[-1]['error_pct']:+.2f}%")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    env = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "command": " ".join([Path(sys.executable).name, "benchmarks/validate_simulation.py", *sys.argv[1:]])}
    (out / "results.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    lines = [f"Simulated (FakeTensorMode, CPU kernels) vs measured (real tensors, same tracker) peak tensor memory, "
             f"seq {args.seq}, micro-batch {args.micro}, {args.steps} optimizer steps, CPU. Command: `{env['command']}`.", "",
             "| model | config | measured MiB | simulated MiB | error | sim s | peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['config']} | failed: {r['error']} | | | | |")
        else:
            lines.append(f"| {r['model']} | {r['config']} | {r['measured_peak_mib']:,} | {r['simulated_peak_mib']:,} | "
                         f"{r['error_pct']:+.2f}% | {r['sim_seconds']} | {r['peak_rss_mib']:,} |")
    ok = [abs(r["error_pct"]) for r in rows if "error_pct" in r]
    if ok:
        lines += ["", f"max |error| {max(ok):.2f}% over {len(ok)} configurations."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
