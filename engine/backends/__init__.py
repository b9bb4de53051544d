"""Backends: the device, precision, optimizer and step of a run (base.py has the interface), and the checkpoint
layout each one writes and reads."""

from __future__ import annotations

import torch

from engine.backends.base import Backend, CheckpointLayout
from engine.backends.deepspeed_backend import DeepSpeedBackend, DeepSpeedLayout
from engine.backends.torch_backend import InBackwardLayout, TorchLayout, single_device_backend
from engine.config import RunConfig, needs_deepspeed
from engine.distributed import DistEnv


def make_backend(cfg: RunConfig, env: DistEnv, model: torch.nn.Module, total_steps: int) -> Backend:
    """The backend `cfg` runs on with `env.world_size` processes (`RunConfig.backend_for`)."""
    if cfg.backend_for(env.world_size) == "deepspeed":
        return DeepSpeedBackend(cfg, env, model, total_steps)
    return single_device_backend(cfg, env, model, total_steps)


def layout_of(run_layout: dict) -> CheckpointLayout:
    """The checkpoint layout a run of this layout (`engine.resume.run_layout`, saved in every checkpoint's trainer
    state) writes: the one class that can read it back. Checkpoints from before "backend" was recorded ran on
    DeepSpeed exactly when `needs_deepspeed` says so."""
    backend = run_layout.get("backend") or (
        "deepspeed" if needs_deepspeed(run_layout["zero_stage"], run_layout["world_size"]) else "torch")
    if backend == "deepspeed":
        return DeepSpeedLayout(run_layout["zero_stage"], run_layout.get("precision", "fp32"), run_layout["optimizer"])
    if run_layout.get("optimizer_in_backward"):
        return InBackwardLayout(run_layout["optimizer"], run_layout.get("master_weights") == "bf16")
    return TorchLayout()
