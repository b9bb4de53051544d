"""Rank/world discovery for whichever launcher started us (deepspeed, torchrun, SLURM, or none)."""

from __future__ import annotations

import os
import re
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


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist, as `scontrol show hostnames` would list it first:
    "gpu[03-04,07],cpu1" -> "gpu03", "rack[1-2]-n[5-6]" -> "rack1-n5"."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    first = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], nodelist[:end])
    return first.strip()


def export_slurm_env(environ=None) -> None:
    """Under plain srun (one task per GPU), publish the torch.distributed variables that DeepSpeed's process group
    reads. The batch script sets MASTER_ADDR (`scontrol show hostnames | head -n1`); without it, the first host of
    the job's nodelist is used."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env and "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        d = dist_env(env)
        env.update(RANK=str(d.rank), LOCAL_RANK=str(d.local_rank), WORLD_SIZE=str(d.world_size))
        env.setdefault("MASTER_PORT", "29500")
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if "MASTER_ADDR" not in env and nodelist:
            env["MASTER_ADDR"] = first_slurm_host(nodelist)
