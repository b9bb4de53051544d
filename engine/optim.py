"""Optimizers (torch AdamW, bitsandbytes 8-bit AdamW, DeepSpeedCPUAdam) and the warmup+decay schedule."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from engine.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; biases, LayerNorm and (for GPT-2's Conv1D too) 1-D params are not decayed."""
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim
        (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str = "cpu") -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adamw":
        # fused/foreach kernels keep fewer temporaries alive on GPU; foreach is the portable default.
        return torch.optim.AdamW(groups, **kw)
    if cfg.name in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if cfg.name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        with warnings.catch_warnings():
            # bitsandbytes warns once per state that paging is CUDA-only and falls back: expected on CPU.
            warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
            return cls(groups, **kw)
    if cfg.name == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    raise ValueError(cfg.name)


def lr_lambda(total_steps: int, sched: ScheduleConfig):
    """Multiplier of the base lr at optimizer step `s` (0-based): linear warmup, then cosine/linear decay."""
    warm = min(sched.warmup_steps, max(total_steps - 1, 0))
    floor = sched.min_lr_ratio

    def f(s: int) -> float:
        if warm and s < warm:
            return (s + 1) / warm
        if sched.decay == "constant" or total_steps <= warm + 1:
            return 1.0
        t = min(1.0, (s - warm) / (total_steps - warm - 1))
        if sched.decay == "linear":
            return floor + (1 - floor) * (1 - t)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, sched: ScheduleConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, sched))
