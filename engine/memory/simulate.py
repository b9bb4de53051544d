"""Simulate a training step's peak memory without real memory or compute (FakeTensorMode).

The simulated step is the engine's own: `build_model` (fused GELU, checkpointing, LoRA/freeze),
the backend's precision handling (fp32 master weights + autocast on the torch backend, 16-bit
module weights under DeepSpeed), `lm_loss_sum` (incl. chunked loss), the real optimizer classes
(or, for the in-backward path, `InBackwardOptimizer` itself), all under `MemoryTracker`.

Kernels decide activation memory (see docs/MEMORY.md):
  kernel="cpu"   the kernels this CPU runs (SDPA falls back to the math kernel with dropout or
                 16-bit inputs and keeps the attention matrix) - validated against real CPU runs.
  kernel="cuda"  GPU prediction: attention is a stand-in whose saved tensors are exactly those of
                 CUDA's flash kernel (q, k, v, out, logsumexp), and the allocator's 512-byte
                 rounding is applied. CUDA context, fragmentation and kernel workspaces are NOT
                 simulated; `GPU_OVERHEAD` is the documented margin for them.

bitsandbytes kernels cannot run on fake tensors: their states are allocated by bitsandbytes' own
`init_state` and the quantized update (which allocates nothing of size) is skipped.
ZeRO partitioning is not run (it needs a process group); `zero_model_states` applies the
partitioning rules to the simulated single-device step.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from engine.config import RunConfig
from engine.loss import lm_loss_sum
from engine.memory.tracker import CUDA_BLOCK, MemoryTracker
from engine.model import DTYPES, build_model, parameter_counts

GIB = 2**30
# CUDA context + cuBLAS/cuDNN workspaces + allocator fragmentation, added to every GPU prediction.
# Typical CUDA 12 context on a T4/A100 is 300-500 MiB; fragmentation is kept as a fraction.
GPU_OVERHEAD = {"context_bytes": 512 * 2**20, "fragmentation": 0.05}


# ----------------------------------------------------------------------------- GPU attention stand-in


class _FlashAttentionStandIn(torch.autograd.Function):
    """Saves what CUDA's flash SDPA saves for backward: q, k, v, out and a fp32 logsumexp per row."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        # flash backward: dq/dk/dv plus a fp32 dq accumulator and the row-wise softmax delta.
        dq_accum = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # noqa: F841
        delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)  # noqa: F841
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def flash_standin_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    out = _FlashAttentionStandIn.apply(query, key, value)  # [B, H, S, D]
    return out.transpose(1, 2).contiguous(), None


def _register_standin() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register("sim_flash", flash_standin_attention)
    return "sim_flash"


# ----------------------------------------------------------------------------- ZeRO rules


def zero_model_states(n_params: int, n_trainable: int, stage: int, world: int, precision: str,
                      optimizer: str = "adamw", offload_optimizer: bool = False, offload_params: bool = False) -> dict:
    """Per-rank bytes of model states under DeepSpeed ZeRO, device and host (pure function).

    16-bit training keeps 16-bit module weights and gradients plus fp32 master weights, fp32 gradient
    partitions and Adam m/v in the optimizer: the 2 + 2 + (4 + 4 + 8) = 18 B/param DeepSpeed's own
    estimator counts (with K = 8 B/param of Adam state; 2 for 8-bit Adam). fp32 training has no separate
    master copy: 4 + 4 + 8.
    """
    half = precision in ("fp16", "bf16")
    w = 2 if half else 4
    state = 2 if optimizer in ("adamw_8bit", "paged_adamw_8bit") else 8
    master = 4 if half else 0
    grad32 = 4 if half else 0
    p_dev = n_params * w / (world if stage == 3 else 1)
    g_dev = n_trainable * w / (world if stage >= 2 else 1)
    opt = n_trainable * (master + grad32 + state) / (world if stage >= 1 else 1)
    out = {"params": p_dev, "grads": g_dev, "optimizer": opt, "host": 0.0}
    if offload_params:
        out["host"] += out["params"]
        out["params"] = 0.0
    if offload_optimizer:
        out["host"] += out["optimizer"]
        out["optimizer"] = 0.0
    out["device_total"] = out["params"] + out["grads"] + out["optimizer"]
    return {k: int(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- the simulation


@dataclass
class SimResult:
    peak_bytes: int
    breakdown: dict[str, int]
    kernel: str
    params: dict[str, int]
    seconds: float
    zero: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def with_gpu_margin(self) -> int:
        return int(self.peak_bytes * (1 + GPU_OVERHEAD["fragmentation"]) + GPU_OVERHEAD["context_bytes"])

    def as_dict(self) -> dict:
        d = asdict(self)
        d["peak_gib"] = round(self.peak_gib, 3)
        return d


def _fake_bnb_step(optimizer) -> None:
    """Allocate bitsandbytes states exactly as its first step does; skip the quantized math."""
    for gindex, group in enumerate(optimizer.param_groups):
        for pindex, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if len(optimizer.state[p]) == 0:
                optimizer.init_state(group, p, gindex, pindex)


def _is_bnb(optimizer) -> bool:
    return type(optimizer).__module__.startswith("bitsandbytes")


def fake_model(cfg: RunConfig) -> torch.nn.Module:
    """`build_model(cfg)` with fake CPU parameters: built on the meta device (no init compute, and no
    module `.to()` on fake tensors, which peft does and fake tensors refuse), then every parameter and
    buffer replaced by a fake tensor of the same shape/dtype (tied weights stay one tensor). Call inside
    a FakeTensorMode."""
    with torch.device("meta"):
        model = build_model(cfg, 50257)
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                made[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="cpu"),
                                                 requires_grad=p.requires_grad)
            module._parameters[name] = made[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device="cpu")
    return model


def simulate(cfg: RunConfig, kernel: str = "cpu", steps: int = 2, zero_world: int = 1) -> SimResult:
    """Peak memory of `steps` optimizer steps of `cfg` (one rank), simulated on fake tensors.

    Torch-backend configurations run `TorchBackend.step_tensors`, the training step itself. DeepSpeed
    configurations run forward/backward on 16-bit module weights and take model states from
    `zero_model_states`.
    """
    from engine.backends.torch_backend import TorchBackend
    from engine.distributed import DistEnv

    if kernel not in ("cpu", "cuda"):
        raise ValueError(kernel)
    t0 = time.perf_counter()
    mem = cfg.memory
    deepspeed = mem.zero_stage > 0 or cfg.train.backend == "deepspeed"
    micro, seq = cfg.train.micro_batch_size, cfg.data.block_size
    notes = []
    tracker = MemoryTracker(round_to=CUDA_BLOCK if kernel == "cuda" else 1)
    # Token ids are real tensors (their count is read on the host); everything else is fake.
    x = torch.randint(0, 50257, (micro, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": x, "labels": x, "n_tokens": micro * (seq - 1)}
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        model = fake_model(cfg)
        if kernel == "cuda":
            model.config._attn_implementation = _register_standin()
        counts = parameter_counts(model)
        backend = None
        if deepspeed:
            if mem.precision != "fp32":
                model = model.to(DTYPES[mem.precision])  # DeepSpeed keeps 16-bit module weights
            model.train()
        else:
            # Optimizer constructors may compute real constants (bitsandbytes' quantization maps).
            with unset_fake_temporarily():
                backend = TorchBackend(cfg, DistEnv(), model, total_steps=steps)
            if mem.precision == "fp16":
                # Loss-scale bookkeeping reads values on the host; it holds no memory worth counting.
                backend.scaler = torch.amp.GradScaler("cpu", enabled=False)
                backend.loss_scale = None
            opts = list(backend.optimizer.optimizers.values()) if mem.optimizer_in_backward else [backend.optimizer]
            for opt in opts:
                if _is_bnb(opt):
                    opt.step = (lambda o: (lambda *a, **k: _fake_bnb_step(o)))(opt)
            model = backend.model
        tracker.track_model(model)
        with tracker:
            for _ in range(steps):
                if backend is not None:
                    backend.step_tensors([batch] * (1 if mem.optimizer_in_backward else cfg.train.grad_accum_steps))
                    for opt in opts:
                        tracker.track_optimizer(opt)
                else:
                    for _ in range(cfg.train.grad_accum_steps):
                        loss_sum, n = lm_loss_sum(model, batch, mem.loss_chunk_size)
                        (loss_sum / n).backward()
                        del loss_sum, n
                    model.zero_grad(set_to_none=True)
    breakdown = dict(tracker.peak_breakdown)
    peak = tracker.peak
    zero = None
    if deepspeed:
        zero = zero_model_states(counts["total"], counts["trainable"], mem.zero_stage, zero_world, mem.precision,
                                 cfg.optim.name, mem.offload_optimizer, mem.offload_params)
        # The simulated run held full 16-bit params and grads; replace them by this rank's partitions and add
        # the optimizer partition (DeepSpeed's fp32 masters, fp32 grads and Adam states).
        peak = peak - breakdown["parameters"] - breakdown["gradients"] + zero["device_total"]
        breakdown.update(parameters=zero["params"], gradients=zero["grads"], optimizer=zero["optimizer"])
        notes.append("ZeRO model states from partitioning rules; activations simulated on one device")
    return SimResult(peak, breakdown, kernel, counts, time.perf_counter() - t0, zero, notes)
