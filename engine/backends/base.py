"""The small interface the step loop talks to. A backend owns the device, precision, optimizer and step.

`train_step` takes all micro-batches of one optimizer step, so gradient accumulation, loss scaling,
clipping and the optimizer step (or ZeRO's partitioned version of it) stay inside the backend and
the loop in `engine/train.py` reads the same for every backend.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from engine.config import RunConfig
from engine.distributed import DistEnv
from engine.metrics import loss_sums, to_device
from engine.model import DTYPES
from engine.portable import PortableState


class CheckpointLayout(ABC):
    """One on-disk form of a backend's state (the single-device step, the in-backward step, DeepSpeed by ZeRO stage
    and precision). The class that writes a checkpoint's files also reads them, as they are (`load`: an unchanged
    resume) and into a layout-free `PortableState` (`to_portable`: another layout, an export); its file names are
    its own constants, spelled nowhere else. `from_portable` writes a PortableState into a live backend of this
    layout."""

    name: str = "checkpoint"

    @abstractmethod
    def save(self, backend: "Backend", ckpt: Path) -> None: ...

    @abstractmethod
    def load(self, backend: "Backend", ckpt: Path) -> None:
        """A checkpoint this layout wrote, into `backend` of the same layout: exact."""

    @abstractmethod
    def to_portable(self, ckpt: Path, with_states: bool = True) -> PortableState:
        """The checkpoint's trainable weights (fp32 masters where the run kept them) and, `with_states`, its optimizer
        state, by parameter name; NotPortable when that state cannot leave this layout."""

    @abstractmethod
    def from_portable(self, backend: "Backend", ps: PortableState) -> None:
        """Another layout's state into `backend` (weights, each parameter's optimizer state if any, the schedule)."""

    def states_problem(self) -> str | None:
        """Why this layout's optimizer state cannot be converted to or from another layout (None: it can). Asked
        before anything loads, so a resume is decided in one place (engine.resume)."""
        return None


@dataclass
class StepStats:
    loss: float  # token-weighted mean over the whole global batch (all ranks)
    tokens: int  # loss tokens in the global batch
    grad_norm: float | None
    skipped: bool  # fp16 overflow: the optimizer step was skipped and the loss scale lowered
    lr: float
    loss_scale: float | None = None


class Backend(ABC):
    name = "base"

    def __init__(self, cfg: RunConfig, dist_env: DistEnv):
        if cfg.memory.precision not in DTYPES:
            raise ValueError(f"memory.precision={cfg.memory.precision!r}: resolve it for the device first "
                             "(engine.devices.resolve_precision)")
        self.cfg = cfg
        self.dist = dist_env
        self.dtype = DTYPES[cfg.memory.precision]

    # -- set by subclasses
    model: torch.nn.Module
    device: torch.device

    @abstractmethod
    def train_step(self, micro_batches: list[dict]) -> StepStats: ...

    layout: CheckpointLayout  # how this backend's checkpoints are written and read (set by subclasses)

    def save(self, ckpt_dir: Path) -> None:
        self.layout.save(self, ckpt_dir)

    def load(self, ckpt_dir: Path) -> None:
        """A checkpoint this backend wrote, in the same layout."""
        self.layout.load(self, ckpt_dir)

    def load_portable(self, ps: PortableState) -> None:
        """A checkpoint of another layout (optimizer state by parameter name, maybe none)."""
        self.layout.from_portable(self, ps)

    @abstractmethod
    def lr(self) -> float: ...

    def optimizers(self) -> list:
        """The optimizer objects holding state (several for the in-backward path)."""
        opt = getattr(self, "optimizer", None)
        if opt is None:
            return []
        return list(opt.optimizers.values()) if hasattr(opt, "optimizers") else [opt]

    def autocast(self):
        return contextlib.nullcontext()

    def to_device(self, batch: dict) -> dict:
        return to_device(batch, self.device)

    # -- collectives (no-ops for one process)
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if it is true on one (a preemption signal may reach only some ranks)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return flag
        return bool(self.all_reduce_sum(torch.tensor([float(flag)], device=self.device)) > 0)

    def barrier(self) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def global_tokens(self, micro_batches: list[dict]) -> torch.Tensor:
        """Loss tokens of the whole global batch, known before any forward (labels are data)."""
        n = sum(b["n_tokens"] for b in micro_batches)
        return self.all_reduce_sum(torch.tensor([float(n)], device=self.device))

    def eval_loss(self, batches: list[dict], weights: list[float] | None = None) -> tuple[float, float]:
        """Summed loss and loss-unit count over batches (each rank its own share), reduced over ranks."""
        return loss_sums(self, batches, weights, self.cfg.memory.loss_chunk_size)
