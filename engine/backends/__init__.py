"""Backends: the device, precision, optimizer and step of a run (base.py has the interface)."""

from __future__ import annotations

import torch

from engine.backends.base import Backend
from engine.backends.deepspeed_backend import DeepSpeedBackend
from engine.backends.torch_backend import single_device_backend
from engine.config import RunConfig
from engine.distributed import DistEnv


def make_backend(cfg: RunConfig, env: DistEnv, model: torch.nn.Module, total_steps: int) -> Backend:
    """The backend `cfg` runs on with `env.world_size` processes (`RunConfig.backend_for`)."""
    if cfg.backend_for(env.world_size) == "deepspeed":
        return DeepSpeedBackend(cfg, env, model, total_steps)
    return single_device_backend(cfg, env, model, total_steps)
