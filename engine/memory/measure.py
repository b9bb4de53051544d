"""Measure real training steps: tracked tensor memory by category, process peak RSS, throughput.

Runs the engine's own backend (`TorchBackend.train_step`, the code `engine train` runs) on random
token batches of the configured shape, under `MemoryTracker`. On CUDA the allocator's peak
(`max_memory_allocated` / `reserved`) is reported beside the tracked figure.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from engine.backends import make_backend
from engine.config import RunConfig
from engine.devices import keep_freed_host_memory, pick_device, resolve_precision, return_freed_host_memory
from engine.distributed import DistEnv
from engine.memory.meter import peak_rss_bytes
from engine.memory.simulate import label_phases
from engine.memory.tracker import MemoryTracker
from engine.model import build_model, compile_blocks, compile_seconds, parameter_counts


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq: int, recompute_fraction: float = 0.0,
                    lora: bool = False) -> float:
    """Training FLOPs per token: 6N + 12*L*h*s (forward 2N + 4Lhs, backward twice that).

    Activation checkpointing re-runs the forward of the checkpointed fraction of blocks. With LoRA the
    frozen weights need no weight gradient, so backward costs ~one forward instead of two.
    """
    fwd = 2 * n_params + 4 * n_layer * n_embd * seq
    bwd = fwd if lora else 2 * fwd
    return fwd + bwd + recompute_fraction * fwd


def measure_matmul_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048,
                        repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an n x n matmul on this device: the MFU denominator, measured in-process."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


@dataclass
class Measurement:
    peak_bytes: int  # tracked tensor peak (0 when not tracked)
    breakdown: dict
    peak_rss_bytes: int
    step_seconds: float  # median after warm-up
    tokens_per_s: float
    flops_per_token: float
    mfu: float
    matmul_peak_flops: float
    params: dict
    cuda_allocated: int | None = None  # torch.cuda.max_memory_allocated over model build + steps
    cuda_reserved: int | None = None  # torch.cuda.max_memory_reserved: what the caching allocator took
    cuda_device_used: int | None = None  # total - free (torch.cuda.mem_get_info) after the steps: nvidia-smi's view
    precision: str = ""
    compile_s: float = 0.0  # torch.compile's seconds in this measurement (compiled blocks: the warm-up step's)
    phase_peaks: dict = field(default_factory=dict)  # measure(phases=True): the tracker's peak per phase, as simulated


def model_shape(cfg: RunConfig) -> tuple[int, int]:
    """(blocks, hidden size) of a random-init configuration (what measure() builds)."""
    fam, arch = cfg.model.architecture()
    shape = fam.shape(arch)
    return shape.n_layer, shape.hidden


def build_for(cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    """The model as `engine train` gets it: on the host (the DeepSpeed engine moves and converts it). On CUDA the
    single-device backend only moves the fp32 model to the GPU, so it is built there directly (same memory, no slow
    host-side random init of a 1.5B model)."""
    if device.type == "cuda" and cfg.backend_for(1) == "torch":
        with torch.device(device):
            return build_model(cfg, 50257)
    return build_model(cfg, 50257)


def run_flops_per_token(cfg: RunConfig, n_params: int) -> float:
    """`flops_per_token` of a run, its full recompute included. (Selective recompute re-runs the cheap ops, and on
    the math attention path its score matmuls, 4*L*h*s per token at most: not counted.)"""
    n_layer, n_embd = model_shape(cfg)
    mem = cfg.memory
    recompute = (1.0 / mem.checkpoint_every_n_layers) if mem.activation_checkpointing and \
        mem.checkpoint_policy == "full" else 0.0
    return flops_per_token(n_params, n_layer, n_embd, cfg.data.block_size, recompute, lora=mem.lora.enabled)


def measure(cfg: RunConfig, steps: int = 3, warmup: int = 1, track: bool = True, phases: bool = False) -> Measurement:
    """Run `steps` real optimizer steps of `cfg` on one device (either backend, one process) and measure them
    (`memory.precision: auto` is resolved for the device, as `engine train` does); `phases`: the tracked peak per
    phase too, labelled as `simulate(phases=True)` labels it.

    The tracker (a dispatch mode) slows every op, so the step time is taken from `steps` further steps run without
    it; untracked (compiled blocks, or track=False), the `steps` themselves are timed."""
    return_freed_host_memory(cfg.memory.release_host_memory)  # peak RSS then follows the tensors (its docstring)
    keep_freed_host_memory(cfg.memory.keep_host_memory)
    device = pick_device(cfg.train.device)
    precision, _ = resolve_precision(cfg.memory.precision, device)
    cfg = cfg.updated({"memory.precision": precision})
    cuda = device.type == "cuda"
    torch.manual_seed(cfg.train.seed)
    micro, seq, accum = cfg.train.micro_batch_size, cfg.data.block_size, cfg.train.grad_accum_steps
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model = build_for(cfg, device)
    counts = parameter_counts(model)
    compile_start = compile_seconds()
    if cfg.train.compile_blocks:  # as `engine train` does; the warm-up step compiles
        compile_blocks(model)
        track = False  # the tracker (a dispatch mode) cannot see compiled kernels: peak RSS / CUDA stats only
    timed = steps if track else 0
    backend = make_backend(cfg, DistEnv(), model, total_steps=warmup + steps + timed)
    tracker = MemoryTracker()
    if track:
        tracker.track_backend(backend)
        if phases:
            label_phases(backend.model, tracker, cfg.memory)
    gen = torch.Generator().manual_seed(0)
    vocab = min(model.get_input_embeddings().weight.shape[0], 50257)

    def step() -> float:
        x = torch.randint(0, vocab, (micro, seq), generator=gen)
        batches = [{"input_ids": x, "labels": x, "n_tokens": micro * (seq - 1)} for _ in range(accum)]
        t = time.perf_counter()
        backend.train_step(batches)  # reads the loss: a host sync, so the time is the step's
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    times = []
    with tracker if track else contextlib.nullcontext():
        for i in range(warmup + steps):
            dt = step()
            if i >= warmup:
                times.append(dt)
            if track:
                tracker.refresh_optimizers()
    if timed:
        times = [step() for _ in range(timed)]
    times.sort()
    step_s = times[len(times) // 2]
    fpt = run_flops_per_token(cfg, counts["total"])
    tps = micro * seq * accum / step_s
    cuda_stats = {}
    if cuda:
        free, total = torch.cuda.mem_get_info(device)
        cuda_stats = dict(cuda_allocated=torch.cuda.max_memory_allocated(device),
                          cuda_reserved=torch.cuda.max_memory_reserved(device), cuda_device_used=total - free)
    peak_flops = measure_matmul_peak(device, backend.dtype if cuda else torch.float32, n=8192 if cuda else 2048)
    return Measurement(
        peak_bytes=tracker.peak,
        breakdown=dict(tracker.peak_breakdown),
        peak_rss_bytes=peak_rss_bytes(),
        step_seconds=step_s,
        tokens_per_s=tps,
        flops_per_token=fpt,
        mfu=tps * fpt / peak_flops,
        matmul_peak_flops=peak_flops,
        params=counts,
        precision=precision,
        compile_s=compile_seconds() - compile_start,
        phase_peaks={k: b for k, (_, b) in tracker.phase_peaks.items()},
        **cuda_stats,
    )
