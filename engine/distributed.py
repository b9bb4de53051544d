"""Rank/world discovery for whichever launcher started us (deepspeed, torchrun, SLURM, or none)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def launched(self) -> bool:
        return self.world_size > 1


def dist_env(environ: dict | None = None) -> DistEnv:
    """deepspeed and torchrun set RANK/LOCAL_RANK/WORLD_SIZE; srun sets SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        return DistEnv(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]))
    return DistEnv()


def export_slurm_env(environ=None) -> None:
    """Under plain srun, publish the torch.distributed variables (MASTER_ADDR must be set by the batch script)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env and "SLURM_NTASKS" in env:
        d = dist_env(env)
        env.update(RANK=str(d.rank), LOCAL_RANK=str(d.local_rank), WORLD_SIZE=str(d.world_size))
        env.setdefault("MASTER_PORT", "29500")
