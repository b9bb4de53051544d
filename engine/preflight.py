"""Pre-flight: before the model is loaded, predict this run's peak memory and stop if it cannot fit.

The prediction is `engine plan`'s: the run's own configuration simulated on fake tensors (`simulate_deep`), with
GPU kernels and the GPU margin on CUDA, this CPU's kernels on CPU. On CUDA it is compared with the device's free
memory, on CPU with the host's available RAM (shared by the ranks on this host). `train.preflight=false` (or
`engine train --no-preflight`) skips it.
"""

from __future__ import annotations

import os

import torch

from engine.config import RunConfig
from engine.distributed import DistEnv
from engine.errors import EngineError
from engine.memory.simulate import compiled_bound, simulate_deep, with_gpu_margin

GIB = 2**30


def available_host_bytes() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def predict_peak(cfg: RunConfig, env: DistEnv, device_type: str) -> dict:
    """Predicted peak bytes per rank on `device_type` ('cuda' adds the GPU margin) and offloaded host bytes."""
    # task=classification is simulated as the causal LM of the same size: its [tokens x vocab] logits are far larger
    # than a head of a few labels, so the prediction errs on the safe side.
    sim_cfg = cfg.model_copy(deep=True, update={"task": "causal_lm"})
    sim_cfg.model.init = "random"  # the architecture is what matters; no weights are read
    sim = simulate_deep(sim_cfg, kernel="cuda" if device_type == "cuda" else "cpu", zero_world=env.world_size)
    peak = compiled_bound(sim.peak_bytes, cfg.train.compile_blocks)  # the eager step's, as the compiled one's bound
    device = with_gpu_margin(peak) if device_type == "cuda" else peak
    return {"device_bytes": device, "host_offload_bytes": (sim.zero or {}).get("host", 0),
            "kernel": sim.kernel, "breakdown": sim.breakdown}


def preflight(cfg: RunConfig, env: DistEnv, device_type: str) -> dict | None:
    """Raise EngineError if the run is predicted not to fit; return the prediction (None if skipped)."""
    if not cfg.train.preflight or cfg.model.family_known() is None:
        return None  # a hub model the engine does not name: nothing to simulate from before loading it
    pred = predict_peak(cfg, env, device_type)

    def how(budget: int) -> str:
        model = cfg.model.size or (cfg.model.name if cfg.model.init == "pretrained" else "gpt2")
        return (f"`engine plan --model {model} --gpu-mem {budget / GIB:.1f}GiB --gpus {env.world_size}"
                f" --seq-len {cfg.data.block_size}{' --lora' if cfg.memory.lora.enabled else ''}` finds one that fits; "
                "train.preflight=false (or --no-preflight) tries anyway")

    if device_type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        pred["available_bytes"] = free
        if pred["device_bytes"] > free:
            raise EngineError(f"pre-flight: this configuration needs {pred['device_bytes'] / GIB:.2f} GiB per GPU "
                              f"(simulated, incl. margin) but {free / GIB:.2f} GiB is free: {how(free)}")
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        need = local * (pred["device_bytes"] + pred["host_offload_bytes"])
        avail = available_host_bytes()
        pred["available_bytes"] = avail
        if avail is not None and need > avail:
            raise EngineError(f"pre-flight: this configuration needs {need / GIB:.2f} GiB of RAM for tensors "
                              f"({local} rank(s), simulated) but {avail / GIB:.2f} GiB is available: {how(avail // local)}")
    return pred
