"""What one transformer block keeps for backward, per family: GPT-2 (LayerNorm, GELU MLP, learned positions), Llama /
Qwen2 (RMSNorm, rotary, grouped-query attention, SwiGLU MLP: three matrices, a wider inner size) and GPT-NeoX
(LayerNorm, partial rotary, parallel attention + MLP, exact GELU).

Simulated (fake tensors: the engine's own step, whose CPU form is validated against real runs, README "How good the
simulation is"): the activations one more block adds (a 3-block model minus a 2-block one, each at its published
width), full fine-tune with bf16 weights (the 8 GB presets' form: the residual stream in bf16), no checkpointing,
dropout as published, GPT-2's GELU swap on (the default), sequence 1024, micro-batch 1. Reported in bytes per
token per hidden unit (the `34·s·b·h` unit of Korthikanti et al.), for GPU kernels (flash attention: no seq x seq
scores) and this CPU's (math attention where it falls back).

    .venv/bin/python benchmarks/family_activations.py             # -> benchmarks/results/family_activations/
    .venv/bin/python benchmarks/family_activations.py --measure   # + the same difference MEASURED on this CPU

`--measure` also trains the 2- and 3-block models for one real step each (bf16 weights stepped in backward with
8-bit AdamW, as the 8 GB presets; the memory tracker labels the same phases as the simulation) at sequence
`--measure-seq` (512: a CPU step of the real widths in seconds), beside the simulation of the same runs on this CPU's
kernels: what SwiGLU, RMSNorm and rotary keep, measured, and how far the simulation is from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.config import load_config  # noqa: E402
from engine.memory.simulate import simulate  # noqa: E402

MODELS = ("gpt2-xl", "SmolLM2-1.7B", "Llama-3.2-1B", "Qwen2.5-1.5B", "pythia-1.4b")
SEQ = 1024


def config(model: str, depth: int, seq: int):
    return load_config(None, ["model.init=random", f"model.name={model}", f"model.n_layer={depth}",
                              f"data.block_size={seq}", "train.micro_batch_size=1", "memory.precision=bf16",
                              "memory.fused_gelu=null", "memory.master_weights=bf16", "memory.optimizer_in_backward=true",
                              "optim.name=adamw_8bit"])


def simulated_activations(cfg, kernel: str) -> int:
    sim = simulate(cfg, kernel=kernel, steps=1, phases=True)
    return max(b["activations"] for _, b in sim.phase_peaks.values())  # (at the end of the forward)


def measured_activations(cfg) -> int:
    """The activations' phase peak of one real tracked step of `cfg` on this CPU, phases labelled as the simulator
    labels them."""
    from engine.memory.measure import measure

    return max(b["activations"] for b in measure(cfg, steps=1, warmup=0, phases=True).phase_peaks.values())


def per_block(model: str, kernel: str, seq: int = SEQ) -> dict:
    """One more block's activations, `kernel` "cuda"/"cpu" (simulated) or "measured" (this CPU, a real step)."""
    acts = {}
    for depth in (2, 3):
        cfg = config(model, depth, seq)
        if kernel == "measured":  # each real model in a process of its own: its memory goes back when it ends
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                acts[depth] = pool.submit(measured_activations, cfg).result()
        else:
            acts[depth] = simulated_activations(cfg, kernel)
    fam, arch = cfg.model.architecture()
    shape = fam.shape(arch)
    block = acts[3] - acts[2]
    return {"model": model, "family": fam.model_type, "kernel": kernel, "seq": seq, "hidden": shape.hidden,
            "inner": shape.intermediate, "heads": shape.n_head, "kv_heads": shape.n_kv_head,
            "block_mib": round(block / 2**20, 1), "bytes_per_token_hidden": round(block / (seq * shape.hidden), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action="store_true", help="also measure on this CPU (real steps, tracked)")
    ap.add_argument("--measure-seq", type=int, default=512, help="the sequence of the measured rows")
    args = ap.parse_args()
    rows = [per_block(m, k) for m in MODELS for k in ("cuda", "cpu")]
    measured = []
    if args.measure:
        for m in MODELS:
            sim, real = per_block(m, "cpu", args.measure_seq), per_block(m, "measured", args.measure_seq)
            real["simulated_bytes_per_token_hidden"] = sim["bytes_per_token_hidden"]
            real["simulated_error_pct"] = round(100 * (sim["block_mib"] / real["block_mib"] - 1), 2)
            measured.append(real)
            print(real, flush=True)
    out = ROOT / "benchmarks/results/family_activations"
    out.mkdir(parents=True, exist_ok=True)
    import torch

    from engine.devices import cpu_name

    env = {"torch": torch.__version__, "cpu": cpu_name(),
           "command": ".venv/bin/python benchmarks/family_activations.py" + (" --measure" if args.measure else "")}
    (out / "results.json").write_text(json.dumps({"env": env, "rows": rows, "measured": measured}, indent=2))
    lines = ["Activations one block keeps for backward (SIMULATED, bf16 weights and compute as the 8 GB presets run, full "
             "fine-tune, GPT-2's GELU swap on; "
             f"sequence {SEQ}, micro-batch 1, no checkpointing, published dropout). Command: `{env['command']}`.", "",
             "| model | family | kernels | hidden | MLP inner | heads (kv) | MiB per block | bytes per token per hidden |",
             "|---|---|---|---:|---:|---|---:|---:|"]
    lines += [f"| {r['model']} | {r['family']} | {r['kernel']} | {r['hidden']:,} | {r['inner']:,} | {r['heads']} "
              f"({r['kv_heads']}) | {r['block_mib']:,} | {r['bytes_per_token_hidden']} |" for r in rows]
    if measured:
        lines += ["", f"MEASURED on this CPU ({env['cpu']}): one real tracked step of the 2- and 3-block models, "
                  f"sequence {args.measure_seq}, the same settings, beside their simulation on this CPU's kernels.", "",
                  "| model | MiB per block, measured | bytes per token per hidden, measured | simulated | simulation error |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['block_mib']:,} | {r['bytes_per_token_hidden']} | "
                  f"{r['simulated_bytes_per_token_hidden']} | {r['simulated_error_pct']:+.2f}% |" for r in measured]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
