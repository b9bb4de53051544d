"""Parameter updates per second of DeepSpeedCPUAdam and torch's fused AdamW on this machine's CPU.

The planner models ZeRO-Offload's host-side optimizer step with this rate (`engine.plan.CPU_ADAM_PARAMS_PER_S`);
this machine has 2 cores, like a Colab host.

    .venv/bin/python benchmarks/cpu_adam_rate.py      # -> benchmarks/results/cpu_adam_rate.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def rate(opt_cls, n: int, steps: int = 5, **kw) -> float:
    p = torch.nn.Parameter(torch.zeros(n))
    p.grad = torch.randn(n) * 1e-3
    opt = opt_cls([p], lr=1e-4, **kw)
    opt.step()  # states allocated
    t = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return n * steps / (time.perf_counter() - t)


def main() -> None:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    n = 100_000_000
    out = {"params_per_step": n, "threads": torch.get_num_threads(),
           "deepspeed_cpu_adam_params_per_s": rate(DeepSpeedCPUAdam, n, adamw_mode=True),
           "torch_fused_adamw_params_per_s": rate(torch.optim.AdamW, n, fused=True)}
    print(json.dumps(out, indent=2))
    (ROOT / "benchmarks/results/cpu_adam_rate.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
