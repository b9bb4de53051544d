"""Activation bytes saved for backward with GPT-2's NewGELUActivation vs the fused tanh GELU.

Real tensors (measured) for small sizes; FakeTensorMode (simulated: same code, no real memory) for
gpt2-large/xl. One forward of batch 1 with the engine's own model builder; counts the bytes autograd
saves for backward, per unique storage, excluding parameters.

    .venv/bin/python benchmarks/gelu_saving.py                # writes benchmarks/results/gelu_saving/
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
from pathlib import Path

import torch

from engine.config import validate_dict
from engine.memory.saved import SavedTensorCounter, default_dtype
from engine.model import build_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def activation_mib(size: str, fused: bool, dropout: float, seq: int, dtype: str, fake: bool) -> float:
    cfg = validate_dict({"model": {"name": size, "init": "random", "dropout": dropout},
                         "data": {"block_size": seq}, "memory": {"fused_gelu": fused}})
    ctx = torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with ctx, default_dtype(DTYPES[dtype]):
        model = build_model(cfg, 50257).train()
        x = torch.randint(0, 50257, (1, seq))
        with SavedTensorCounter() as c:
            model(input_ids=x, use_cache=False)
    return c.activation_bytes / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/gelu_saving")
    args = ap.parse_args()
    rows = []
    cases = [("gpt2", 1024, "fp32", 0.0, False), ("gpt2", 1024, "fp32", 0.1, False),
             ("gpt2-large", 1024, "fp16", 0.0, True), ("gpt2-large", 1024, "fp16", 0.1, True),
             ("gpt2-xl", 1024, "fp16", 0.0, True)]
    for size, seq, dtype, dropout, fake in cases:
        old = activation_mib(size, False, dropout, seq, dtype, fake)
        new = activation_mib(size, True, dropout, seq, dtype, fake)
        rows.append({"model": size, "seq": seq, "dtype": dtype, "dropout": dropout,
                     "mode": "simulated (FakeTensorMode)" if fake else "measured",
                     "NewGELU_MiB": round(old, 1), "fused_MiB": round(new, 1), "saved_pct": round(100 * (1 - new / old), 1)})
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| model | seq | dtype | attn dropout | how | NewGELU act. MiB | fused act. MiB | saved |",
             "|---|---:|---|---:|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['seq']} | {r['dtype']} | {r['dropout']} | {r['mode']} | {r['NewGELU_MiB']:,} | "
              f"{r['fused_MiB']:,} | {r['saved_pct']}% |" for r in rows]
    note = ("\nActivation bytes autograd saves in one forward (batch 1, CPU kernels: SDPA math fallback when dropout>0), "
            "parameters excluded. Command: `.venv/bin/python benchmarks/gelu_saving.py`. "
            f"torch {torch.__version__}, {platform.processor() or platform.machine()}.\n")
    (out / "results.md").write_text("\n".join(lines) + "\n" + note)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
