"""What one transformer block keeps for backward, per family: GPT-2 (LayerNorm, GELU MLP, learned positions), Llama /
Qwen2 (RMSNorm, rotary, grouped-query attention, SwiGLU MLP: three matrices, a wider inner size) and GPT-NeoX
(LayerNorm, partial rotary, parallel attention + MLP, exact GELU).

Simulated (fake tensors: the engine's own step, whose CPU form is validated against real runs, README "How good the
simulation is"): the activations one more block adds (a 3-block model minus a 2-block one, each at its published
width), full fine-tune with bf16 weights (the 8 GB presets' form: the residual stream in bf16), no checkpointing,
dropout as published, GPT-2's GELU swap on (the default), sequence 1024, micro-batch 1. Reported in bytes per
token per hidden unit (the `34·s·b·h` unit of Korthikanti et al.), for GPU kernels (flash attention: no seq x seq
scores) and this CPU's (math attention where it falls back).

    .venv/bin/python benchmarks/family_activations.py   # -> benchmarks/results/family_activations/
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.config import load_config  # noqa: E402
from engine.memory.simulate import simulate  # noqa: E402

MODELS = ("gpt2-xl", "SmolLM2-1.7B", "Llama-3.2-1B", "Qwen2.5-1.5B", "pythia-1.4b")
SEQ = 1024


def per_block(model: str, kernel: str) -> dict:
    acts = {}
    for depth in (2, 3):
        cfg = load_config(None, ["model.init=random", f"model.name={model}", f"model.n_layer={depth}",
                                 f"data.block_size={SEQ}", "train.micro_batch_size=1", "memory.precision=bf16",
                                 "memory.fused_gelu=null", "memory.master_weights=bf16", "memory.optimizer_in_backward=true"])
        sim = simulate(cfg, kernel=kernel, steps=1, phases=True)
        acts[depth] = max(b["activations"] for _, b in sim.phase_peaks.values())  # (at the end of the forward)
    fam, arch = cfg.model.architecture()
    shape = fam.shape(arch)
    block = acts[3] - acts[2]
    return {"model": model, "family": fam.model_type, "kernel": kernel, "hidden": shape.hidden,
            "inner": shape.intermediate, "heads": shape.n_head, "kv_heads": shape.n_kv_head,
            "block_mib": round(block / 2**20, 1), "bytes_per_token_hidden": round(block / (SEQ * shape.hidden), 2)}


def main() -> None:
    rows = [per_block(m, k) for m in MODELS for k in ("cuda", "cpu")]
    out = ROOT / "benchmarks/results/family_activations"
    out.mkdir(parents=True, exist_ok=True)
    import torch

    env = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "command": ".venv/bin/python benchmarks/family_activations.py"}
    (out / "results.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    lines = ["Activations one block keeps for backward (SIMULATED, bf16 weights and compute as the 8 GB presets run, full "
             "fine-tune, GPT-2's GELU swap on; "
             f"sequence {SEQ}, micro-batch 1, no checkpointing, published dropout). Command: `{env['command']}`.", "",
             "| model | family | kernels | hidden | MLP inner | heads (kv) | MiB per block | bytes per token per hidden |",
             "|---|---|---|---:|---:|---|---:|---:|"]
    lines += [f"| {r['model']} | {r['family']} | {r['kernel']} | {r['hidden']:,} | {r['inner']:,} | {r['heads']} "
              f"({r['kv_heads']}) | {r['block_mib']:,} | {r['bytes_per_token_hidden']} |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
