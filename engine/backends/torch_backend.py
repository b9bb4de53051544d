"""Plain PyTorch on one device (CPU or one GPU): autocast mixed precision, GradScaler for fp16; and its
optimizer-in-backward form, which steps every parameter inside backward.

No DeepSpeed engine in the way, which is what the single-device low-memory path builds on.

The memory simulator runs these very steps on fake tensors. Fake tensors have no values, so it builds the backend
with `values=False`: no non-finite check, no loss scaling (both read values on the host; neither holds memory
worth counting), and `optimizer_step` allocating the states of optimizers whose kernels cannot run on fake tensors.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from engine.backends.base import Backend, StepStats
from engine.config import RunConfig
from engine.devices import pick_device
from engine.distributed import DistEnv
from engine.errors import ConfigError
from engine.loss import batch_loss_sum
from engine.model import cast_frozen_matmul_weights
from engine.optim import (
    DynamicLossScale,
    InBackwardOptimizer,
    build_optimizer,
    build_scheduler,
    lr_lambda,
    run_step,
    set_param_state,
    set_schedule_position,
    step_context,
)
from engine.portable import NotPortable, PortableState


class TorchBackend(Backend):
    """fp32 master weights; autocast runs matmuls in 16-bit and keeps 16-bit activations for backward."""

    name = "torch"

    def __init__(self, cfg: RunConfig, dist_env: DistEnv, model: torch.nn.Module, total_steps: int, *,
                 values: bool = True, optimizer_step: Callable[[torch.optim.Optimizer], None] = run_step):
        super().__init__(cfg, dist_env)
        self.device = pick_device(cfg.train.device)
        if any(p.device != self.device for p in model.parameters()):
            model = model.to(self.device)
        if cfg.memory.precision != "fp32" and cfg.memory.frozen_weights_16bit:
            cast_frozen_matmul_weights(model, self.dtype, embeddings=cfg.memory.lora.quantize_base != "none")
        self.model = model
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # fp16 needs loss scaling; the simulation (values=False) has no values to scale.
        self.loss_scaling = cfg.memory.precision == "fp16" and values
        self.skip_nonfinite = values
        self.optimizer_step = optimizer_step
        self.setup_optimizer(total_steps)

    def setup_optimizer(self, total_steps: int) -> None:
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
                loss_sum, _ = batch_loss_sum(self.model, mb, self.cfg.memory.loss_chunk_size)
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

    # -- checkpoints: trainable weights as safetensors, optimizer/scheduler/scaler as weights-only torch files
    def optimizer_state(self) -> dict:
        names = {id(p): n for n, p in self.model.named_parameters()}
        # The parameters' names in the optimizer's order: what lets another layout read the state (engine.portable).
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "param_names": [[names[id(p)] for p in g["params"]] for g in self.optimizer.param_groups]}

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def save(self, ckpt_dir: Path) -> None:
        trainable = {n: p.detach().contiguous().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        save_file(trainable, str(ckpt_dir / "trainable.safetensors"))
        torch.save(self.optimizer_state(), ckpt_dir / "optimizer.pt")

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        expected = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
            raise ValueError(f"checkpoint weights do not match this model (missing {missing}, unexpected {extra})")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, w in state.items():
                params[n].copy_(w)  # exact: the same dtype, or fp32 masters into fp32 weights

    def load(self, ckpt_dir: Path) -> None:
        self.load_weights(load_file(str(ckpt_dir / "trainable.safetensors"), device=str(self.device)))
        self.load_optimizer_state(torch.load(ckpt_dir / "optimizer.pt", map_location=self.device, weights_only=True))

    def load_portable(self, ps: PortableState) -> None:
        """A checkpoint from another layout: weights, then each parameter's optimizer state by name (none: the
        optimizer starts fresh), then the schedule's position."""
        self.load_weights(ps.weights)
        for name, p in self.model.named_parameters():
            if name in ps.states:
                set_param_state(self.optimizer, p, ps.states[name])
        set_schedule_position(self.scheduler, ps.scheduler_steps)


class InBackwardBackend(TorchBackend):
    """`memory.optimizer_in_backward`: one optimizer per parameter, stepped from the parameter's gradient hook, so no
    model-sized gradient buffer ever exists. One micro-batch per step (nothing can accumulate), no clipping (the
    global norm does not exist yet when a parameter steps); fp16 uses `DynamicLossScale`."""

    name = "torch"

    def setup_optimizer(self, total_steps: int) -> None:
        master_bf16 = self.cfg.memory.master_weights == "bf16"
        if master_bf16:
            if self.dtype == torch.float32:
                raise ConfigError("memory.master_weights=bf16 computes in 16 bits, but memory.precision resolved to "
                                  "fp32 on this device: set master_weights=fp32 here")
            for p in self.model.parameters():
                if p.is_floating_point():
                    p.data = p.data.to(torch.bfloat16)  # the weights themselves: no fp32 master copy
            if self.dtype == torch.float16:
                compute_fp16_from_bf16(self.model)
        self.optimizer = InBackwardOptimizer(self.model, self.cfg.optim, self.device.type, self.optimizer_step,
                                             master_bf16=master_bf16)
        self.lr_fn = lr_lambda(total_steps, self.cfg.schedule)
        self.steps_done = 0
        self.optimizer.lr = self.cfg.optim.lr * self.lr_fn(0)
        self.loss_scale = DynamicLossScale() if self.loss_scaling else None

    def optimizers(self) -> list:
        return list(self.optimizer.optimizers.values())

    def step_tensors(self, micro_batches: list[dict]) -> dict:
        """Forward, then a backward during which every parameter is updated and its gradient freed."""
        mb = self.to_device(micro_batches[0])
        n = mb["n_tokens"]
        opt = self.optimizer
        lr = opt.lr
        scale = self.loss_scale.scale if self.loss_scale else 1.0
        opt.inv_scale, opt.overflow = 1.0 / scale, False
        with self.autocast():
            # Gradients are freed as they come here, so the tied head's, made at the start of backward and held to
            # its end, would sit on every block's peak: made at the end instead (engine.loss.DeferredHeadWeightGrad).
            # Not on the plain step: its gradient buffer peaks at the end, where the deferred work would add to it.
            loss_sum, _ = batch_loss_sum(self.model, mb, self.cfg.memory.loss_chunk_size, defer_head_grad=True)
        (loss_sum * (scale / n)).backward()
        if self.loss_scale:
            self.loss_scale.update(opt.overflow)
        self.steps_done += 1
        opt.lr = self.cfg.optim.lr * self.lr_fn(self.steps_done)
        return {"loss_sum": loss_sum.detach(), "tokens": torch.tensor(float(n)), "grad_norm": None,
                "skipped": opt.overflow, "lr": lr, "loss_scale": self.loss_scale.scale if self.loss_scale else None}

    def optimizer_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "steps_done": self.steps_done,
                "loss_scale": self.loss_scale.state_dict() if self.loss_scale else None}

    def load_portable(self, ps: PortableState) -> None:
        if self.optimizer.pieces and ps.states:
            raise NotPortable("this run steps its optimizer in pieces (bf16 weights, Adafactor or 4-bit AdamW), whose "
                              "states only a checkpoint of the same layout fills")
        self.load_weights(ps.weights)
        for name, p in self.model.named_parameters():
            if name in ps.states:
                set_param_state(self.optimizer.optimizers[name], p, ps.states[name])
        self.steps_done = ps.scheduler_steps
        self.optimizer.lr = self.cfg.optim.lr * self.lr_fn(self.steps_done)

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_done = state["steps_done"]
        if self.loss_scale and state["loss_scale"]:
            self.loss_scale.load_state_dict(state["loss_scale"])


def compute_fp16_from_bf16(model: torch.nn.Module) -> None:
    """bf16 weights on a GPU without bf16 math (T4, V100): autocast runs every matmul in fp16 from the bf16 weights
    (a cast per use; a bf16 weight of normal magnitude is exact in fp16). Embedding lookups are not autocast ops,
    so their bf16 outputs are cast to fp16 here: otherwise bf16 + fp16 would promote the residual stream to fp32.
    LayerNorms run in fp32, as CUDA's autocast runs them (CPU autocast would meet fp16 inputs with bf16 weights, a
    combination its kernel refuses). Gradients reach the weights in bf16 after fp16 loss scaling."""
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            module.register_forward_hook(lambda _m, _args, out: out.to(torch.float16))
        elif isinstance(module, torch.nn.LayerNorm):
            module.forward = types.MethodType(fp32_layer_norm, module)


def fp32_layer_norm(module: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return torch.nn.functional.layer_norm(x.float(), module.normalized_shape, module.weight.float(),
                                              module.bias.float(), module.eps)


def single_device_backend(cfg: RunConfig, dist_env: DistEnv, model: torch.nn.Module, total_steps: int,
                          **kw) -> TorchBackend:
    """The single-device backend `cfg` asks for (optimizer-in-backward or the plain step)."""
    cls = InBackwardBackend if cfg.memory.optimizer_in_backward else TorchBackend
    return cls(cfg, dist_env, model, total_steps, **kw)
