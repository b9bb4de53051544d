"""Plain PyTorch on one device (CPU or one GPU): autocast mixed precision, GradScaler for fp16; and its
optimizer-in-backward form, which steps every parameter inside backward.

No DeepSpeed engine in the way, which is what the single-device low-memory path builds on.

The memory simulator runs these very steps on fake tensors. Fake tensors have no values, so it builds the backend
with `values=False`: no non-finite check, no loss scaling (both read values on the host; neither holds memory
worth counting), and `optimizer_step` allocating the states of optimizers whose kernels cannot run on fake tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.backends.base import Backend, CheckpointLayout, StepStats
from engine.config import RunConfig
from engine.devices import pick_device
from engine.distributed import DistEnv
from engine.loss import batch_loss_sum
from engine.optim import (
    DynamicLossScale,
    InBackwardOptimizer,
    build_optimizer,
    build_scheduler,
    is_pieced,
    run_step,
    set_param_state,
    set_schedule_position,
    step_context,
)
from engine.portable import LazyTensors, NotPortable, PortableState, check_names, states_by_name


class TorchLayout(CheckpointLayout):
    """The single-device backend's checkpoint: the trainable weights as safetensors (in their training dtype: fp32
    masters, or bf16 weights with memory.master_weights=bf16) and one weights-only torch file with the optimizer,
    the schedule and the loss scaler."""

    TRAINABLE = "trainable.safetensors"
    OPTIMIZER = "optimizer.pt"
    name = "the single-device torch backend"

    def save(self, backend: "TorchBackend", ckpt: Path) -> None:
        save_file(backend.trainable_weights(), str(ckpt / self.TRAINABLE))
        torch.save(backend.optimizer_state(), ckpt / self.OPTIMIZER)

    def load(self, backend: "TorchBackend", ckpt: Path) -> None:
        backend.load_weights(self.weights(ckpt))
        backend.load_optimizer_state(torch.load(ckpt / self.OPTIMIZER, map_location=backend.device, weights_only=True))

    def weights(self, ckpt: Path) -> LazyTensors:
        """The trainable weights by name, each read from the file when asked for."""
        path = str(ckpt / self.TRAINABLE)
        with safe_open(path, framework="pt") as f:
            names = list(f.keys())

        def read(name: str) -> torch.Tensor:
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(name)

        return LazyTensors(names, read)

    def to_portable(self, ckpt: Path, with_states: bool = True) -> PortableState:
        saved = torch.load(ckpt / self.OPTIMIZER, map_location="cpu", weights_only=True, mmap=True)
        # (an in-backward checkpoint written when that step kept its own count of steps has "steps_done")
        steps = int(saved["scheduler"]["last_epoch"] if "scheduler" in saved else saved["steps_done"])
        states = self.states_by_name(saved) if with_states else {}
        return PortableState(self.weights(ckpt), states, steps, self.name)

    def states_by_name(self, saved: dict) -> dict[str, dict[str, torch.Tensor]]:
        names = saved.get("param_names")
        if names is None:
            raise NotPortable("it was written before checkpoints named their optimizer's parameters")
        return states_by_name(saved["optimizer"], names)

    def from_portable(self, backend: "TorchBackend", ps: PortableState) -> None:
        """Weights, then each parameter's optimizer state by name (none: the optimizer starts fresh), then the
        schedule's position."""
        backend.load_weights(ps.weights)
        for name, p in backend.model.named_parameters():
            if name in ps.states:
                set_param_state(backend.optimizer, p, ps.states[name])
        set_schedule_position(backend.scheduler, ps.scheduler_steps)


class InBackwardLayout(TorchLayout):
    """The optimizer-in-backward checkpoint: the same files, the optimizer state being one state dict per parameter
    (or per piece of one: `InBackwardOptimizer`, which writes and reads that format)."""

    name = "the single-device optimizer-in-backward step"

    def __init__(self, optimizer: str, master_bf16: bool):
        self.pieced = is_pieced(optimizer, master_bf16)

    def states_problem(self) -> str | None:
        if self.pieced:
            return ("its optimizer is stepped in pieces (bf16 weights, Adafactor or 4-bit AdamW), whose states only a "
                    "checkpoint of the same setup fills")
        return None

    def states_by_name(self, saved: dict) -> dict[str, dict[str, torch.Tensor]]:
        return InBackwardOptimizer.states_by_name(saved["optimizer"])

    def from_portable(self, backend: "TorchBackend", ps: PortableState) -> None:
        backend.load_weights(ps.weights)
        backend.optimizer.set_states(ps.states)
        set_schedule_position(backend.scheduler, ps.scheduler_steps)


class TorchBackend(Backend):
    """fp32 master weights; autocast runs matmuls in 16-bit and keeps 16-bit activations for backward."""

    name = "torch"

    def __init__(self, cfg: RunConfig, dist_env: DistEnv, model: torch.nn.Module, total_steps: int, *,
                 values: bool = True, optimizer_step: Callable[[torch.optim.Optimizer], None] = run_step):
        super().__init__(cfg, dist_env)
        self.device = pick_device(cfg.train.device)
        if any(p.device != self.device for p in model.parameters()):
            model = model.to(self.device)
        self.model = model
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # fp16 needs loss scaling; the simulation (values=False) has no values to scale.
        self.loss_scaling = cfg.memory.precision == "fp16" and values
        self.skip_nonfinite = values
        self.optimizer_step = optimizer_step
        self.setup_optimizer(total_steps)

    def setup_optimizer(self, total_steps: int) -> None:
        self.layout = TorchLayout()
        self.optimizer = build_optimizer(self.model, self.cfg.optim, self.device.type)
        self.scheduler = build_scheduler(self.optimizer, total_steps, self.cfg.schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.loss_scaling)

    def autocast(self):
        # The autocast cache keeps a 16-bit copy of every weight until forward ends; under activation
        # checkpointing nothing else holds those copies, so dropping the cache saves 2 B/param.
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.cfg.memory.precision != "fp32",
                              cache_enabled=not self.cfg.memory.activation_checkpointing)

    def lr(self) -> float:
        lr = self.optimizer.param_groups[0]["lr"]
        if isinstance(lr, torch.Tensor):  # torchao's (a fake tensor in the simulator): the schedule's value
            return self.cfg.optim.lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        return lr

    def train_step(self, micro_batches: list[dict]) -> StepStats:
        t = self.step_tensors(micro_batches)
        # The only host syncs of the step: reading the loss (and norm) for logging.
        return StepStats(
            loss=float(t["loss_sum"] / t["tokens"]),
            tokens=int(t["tokens"]),
            grad_norm=float(t["grad_norm"]) if t["grad_norm"] is not None else None,
            skipped=t["skipped"],
            lr=t["lr"],
            loss_scale=t["loss_scale"],
        )

    def step_tensors(self, micro_batches: list[dict]) -> dict:
        """One optimizer step; results stay tensors (the memory simulator runs this on fake tensors)."""
        n_global = self.global_tokens(micro_batches)
        loss_acc = torch.zeros((), dtype=torch.float64, device=self.device)
        for mb in micro_batches:
            mb = self.to_device(mb)
            with self.autocast():
                loss_sum, _ = batch_loss_sum(self.model, mb, self.cfg.memory.loss_chunk_size,
                                             fused_head=self.cfg.memory.fused_head_loss)
            # Dividing by the global token count makes accumulation exactly a token-weighted mean.
            self.scaler.scale(loss_sum / n_global).backward()
            loss_acc += loss_sum.detach().double()
            del loss_sum
        lr = self.lr()
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip else float("inf"))
        scale_before = self.scaler.get_scale() if self.loss_scaling else None
        if scale_before is None and self.skip_nonfinite and not bool(torch.isfinite(grad_norm)):
            # fp32/bf16: a non-finite gradient would make every weight NaN; skip the step as GradScaler does for
            # fp16 (one host sync per step, for the norm that is logged anyway).
            skipped = True
        elif self.loss_scaling:
            with step_context(self.optimizer):
                self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale_before
        else:
            self.optimizer_step(self.optimizer)
            skipped = False
        self.optimizer.zero_grad(set_to_none=True)  # frees gradient memory until the next backward
        self.scheduler.step()
        return {"loss_sum": loss_acc, "tokens": n_global.double(), "grad_norm": grad_norm, "skipped": skipped, "lr": lr,
                "loss_scale": self.scaler.get_scale() if self.loss_scaling else None}

    # -- checkpoint content (TorchLayout writes and reads the files)
    def trainable_weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().contiguous().cpu() for n, p in self.model.named_parameters() if p.requires_grad}

    def optimizer_state(self) -> dict:
        names = {id(p): n for n, p in self.model.named_parameters()}
        # The parameters' names in the optimizer's order: what lets another layout read the state (to_portable).
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "param_names": [[names[id(p)] for p in g["params"]] for g in self.optimizer.param_groups]}

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def load_weights(self, state) -> None:
        """Trainable weights by name (a dict or `LazyTensors`), copied into the model one at a time: exact, the same
        dtype, or fp32 masters into fp32 weights."""
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        check_names(state, params)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])


class InBackwardBackend(TorchBackend):
    """`memory.optimizer_in_backward`: one optimizer per parameter, stepped from the parameter's gradient hook, so no
    model-sized gradient buffer ever exists. One micro-batch per step (nothing can accumulate); clipping by
    `optim.clip_in_backward` (InBackwardOptimizer._clip_); fp16 uses `DynamicLossScale`."""

    name = "torch"

    def setup_optimizer(self, total_steps: int) -> None:
        master_bf16 = self.cfg.memory.master_weights == "bf16"  # the weights are bf16 already (engine.model)
        self.layout = InBackwardLayout(self.cfg.optim.name, master_bf16)
        self.optimizer = InBackwardOptimizer(self.model, self.cfg.optim, self.device.type, self.optimizer_step,
                                             master_bf16=master_bf16)
        # An ordinary scheduler sets the lr the hooks read: the schedule's state is the plain step's.
        self.scheduler = build_scheduler(self.optimizer, total_steps, self.cfg.schedule)
        self.loss_scale = DynamicLossScale() if self.loss_scaling else None

    def optimizers(self) -> list:
        return list(self.optimizer.optimizers.values())

    def step_tensors(self, micro_batches: list[dict]) -> dict:
        """Forward, then a backward during which every parameter is updated and its gradient freed. With clipping,
        `exact` (and `stale` on its first step) runs a measuring forward+backward first, with the same random
        numbers (dropout), whose global norm the stepping backward divides by."""
        mb = self.to_device(micro_batches[0])
        n = mb["n_tokens"]
        opt = self.optimizer
        lr = opt.lr
        scale = self.loss_scale.scale if self.loss_scale else 1.0
        exact = self.cfg.optim.clip_in_backward == "exact"
        untried_scale = self.loss_scale is not None and self.loss_scale.untried
        if untried_scale or (opt.clip is not None and (exact or opt.clip_norm is None)):
            scale = self.measure(mb, n)
        opt.begin_backward(1.0 / scale, bound_by_partial=not exact)
        loss_sum = self.forward_backward(mb, scale / n)
        grad_norm = opt.global_norm()
        if grad_norm is not None and not exact:  # what the next step's gradients are scaled by (if finite)
            opt.clip_norm = torch.where(torch.isfinite(grad_norm), grad_norm, opt.clip_norm)
        if self.loss_scale:
            self.loss_scale.update(opt.overflow)
        opt.step()  # (a no-op: the parameters stepped in backward) then the schedule moves on, as after any step
        self.scheduler.step()
        return {"loss_sum": loss_sum, "tokens": torch.tensor(float(n)), "grad_norm": grad_norm,
                "skipped": opt.overflow, "lr": lr, "loss_scale": self.loss_scale.scale if self.loss_scale else None}

    def measure(self, mb: dict, n: int) -> float:
        """A forward+backward that steps nothing (the same random numbers as the stepping one): the global norm
        exact clipping divides by, and under fp16 a loss scale that does not overflow, halved until it does not (a
        skipped parameter would otherwise step out of line with the rest). Returns the scale to step with."""
        opt, ls = self.optimizer, self.loss_scale
        devices = [self.device] if self.device.type == "cuda" else []
        while True:
            scale = ls.scale if ls else 1.0
            with torch.random.fork_rng(devices=devices, device_type=self.device.type):
                opt.begin_backward(1.0 / scale, measuring=True)
                self.forward_backward(mb, scale / n)
            if not (ls and opt.overflow) or ls.at_minimum:
                break
            ls.update(True)
        opt.clip_norm = opt.global_norm()
        return scale

    def forward_backward(self, mb: dict, loss_factor: float) -> torch.Tensor:
        with self.autocast():
            # Gradients are freed as they come here, so the tied head's, made at the start of backward and held to
            # its end, would sit on every block's peak: made at the end instead (engine.loss.DeferredHeadWeightGrad).
            # Not on the plain step: its gradient buffer peaks at the end, where the deferred work would add to it.
            loss_sum, _ = batch_loss_sum(self.model, mb, self.cfg.memory.loss_chunk_size, defer_head_grad=True,
                                         fused_head=self.cfg.memory.fused_head_loss)
        (loss_sum * loss_factor).backward()
        return loss_sum.detach()

    def optimizer_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "loss_scale": self.loss_scale.state_dict() if self.loss_scale else None}

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        else:  # written when this step kept its own count of steps
            set_schedule_position(self.scheduler, state["steps_done"])
        if self.loss_scale and state["loss_scale"]:
            self.loss_scale.load_state_dict(state["loss_scale"])


def single_device_backend(cfg: RunConfig, dist_env: DistEnv, model: torch.nn.Module, total_steps: int,
                          **kw) -> TorchBackend:
    """The single-device backend `cfg` asks for (optimizer-in-backward or the plain step)."""
    cls = InBackwardBackend if cfg.memory.optimizer_in_backward else TorchBackend
    return cls(cfg, dist_env, model, total_steps, **kw)
