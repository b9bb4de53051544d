"""Simulate a training step's peak memory without real memory or compute (FakeTensorMode).

The simulated step is the engine's own: `build_model` (fused GELU, checkpointing, LoRA/freeze),
the backend's precision handling (fp32 master weights + autocast on the torch backend, 16-bit
module weights under DeepSpeed), `lm_loss_sum` (incl. chunked loss), the real optimizer classes
(or, for the in-backward path, `InBackwardOptimizer` itself), all under `MemoryTracker`.

Kernels decide activation memory (see docs/MEMORY.md):
  kernel="cpu"   the kernels this CPU runs (SDPA falls back to the math kernel with dropout or
                 16-bit inputs and keeps the attention matrix; with train.fast_dropout the engine's own math
                 path, engine/fast_dropout.py, runs as it runs) - validated against real CPU runs.
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

import contextlib
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake, unset_fake_temporarily

from engine.backends.deepspeed_backend import load_user_ds_json, make_ds_config
from engine.backends.torch_backend import single_device_backend
from engine.config import STATE_BYTES, MemoryConfig, RunConfig
from engine.devices import resolve_precision
from engine.distributed import DistEnv
from engine.loss import lm_loss_sum
from engine.memory.tracker import CUDA_BLOCK, MemoryTracker, in_backward
from engine.families import family_of
from engine.model import DTYPES, build_model, parameter_counts, unwrap

GIB = 2**30
# CUDA context + cuBLAS/cuDNN workspaces + allocator fragmentation, added to every GPU prediction.
# Typical CUDA 12 context on a T4/A100 is 300-500 MiB; fragmentation is kept as a fraction.
GPU_OVERHEAD = {"context_bytes": 512 * 2**20, "fragmentation": 0.05}
# Compiled blocks (train.compile_blocks): the simulation runs the eager step (the tracker cannot see compiled
# kernels), and the compiled step is bounded by it times COMPILED_BOUND. Measured on the 2-core Xeon
# (benchmarks/results/speed_options, 6 eager/compiled pairs of gpt2 2 x 512): the compiled step's peak RSS exceeded
# the eager step's by at most 8.1% of the eager tracked peak (selective recompute; 5 pairs were lower, by up to 48%).
# tests/test_plan.py holds it to that file.
COMPILED_BOUND = 1.09


def compiled_bound(peak_bytes: int, compiled: bool) -> int:
    """The simulated (eager) peak as the bound a compiled step's memory is predicted by."""
    return int(peak_bytes * COMPILED_BOUND) if compiled else peak_bytes


def with_gpu_margin(peak_bytes: int) -> int:
    """A simulated peak plus GPU_OVERHEAD: what a GPU prediction states."""
    return int(peak_bytes * (1 + GPU_OVERHEAD["fragmentation"]) + GPU_OVERHEAD["context_bytes"])


@contextlib.contextmanager
def fake_tensors_are_no_trace():
    """transformers takes a fake tensor for a graph being traced (`is_tracing`) and then builds the causal mask that a
    real step skips (SDPA's is_causal path): with the mask, grouped-query attention repeats the keys and values
    instead of SDPA's enable_gqa, and both stay saved for backward. Measured before this (2026-12-03, this CPU):
    +1.17% on Qwen2.5-0.5B with LoRA, +1.96% on SmolLM2-360M, 0.00% on GPT-2 and GPT-NeoX. The simulator's fake
    tensors stand for real ones, so while it runs, masking asks only the other tracing checks. Its look for packed
    sequences in the position ids (which would read fake values) answers what the real step finds: none, since the
    engine passes no position ids and transformers makes them 0..n-1."""
    import transformers.masking_utils as masking

    traced, packed = masking.is_tracing, masking.find_packed_sequence_indices
    masking.is_tracing = lambda tensor=None: traced(None if is_fake(tensor) else tensor)
    masking.find_packed_sequence_indices = lambda position_ids: None if is_fake(position_ids) else packed(position_ids)
    try:
        yield
    finally:
        masking.is_tracing, masking.find_packed_sequence_indices = traced, packed


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
                      optimizer: str = "adamw", offload_optimizer: bool = False, offload_params: bool = False,
                      largest_layer_params: int = 0, reduce_bucket_size: float = 0, overlap_comm: bool = False,
                      largest_param: int = 0, reuse_distance: float = 0, prefetch_bucket_size: float = 0) -> dict:
    """Per-rank bytes of model states under DeepSpeed ZeRO, on the device and in host RAM (pure function).

    Mixed precision (fp16/bf16) keeps 16-bit module weights, fp32 master weights, fp32 gradient partitions
    and the optimizer state (K = 8 B/param for Adam, 2 for 8-bit Adam):
      stage 0/1: params16 2Ψ + grads16 2Ψ on every rank; master + grads32 + state (4+4+K)Ψ, /N from stage 1
      stage 2:   grads16 partitioned too: 2Ψ + (2+4+4+K)Ψ/N  (= DeepSpeed's 2Ψ + 18Ψ/N estimate for Adam)
      stage 3:   everything partitioned: (2+4+4+K)Ψ/N = 18Ψ/N, plus the gathered working set of the largest
                 layer (16-bit param + grad: 4 B x its params), as DeepSpeed's stage-3 estimate counts it
    With offload_optimizer the fp32 master/grads/state live in host RAM (stage >= 2 also streams the 16-bit
    gradients there, so only params16 stay on the device); offload_params moves the 16-bit params too.
    fp32 training under ZeRO >= 1 still keeps a separate fp32 master partition (4/N), and stage 3 a separate fp32
    gradient partition (4/N), as measured on real 2-rank runs (`logging.track_memory`); stage 0 steps the module's
    own weights.
    `buffers` (not in `device_total`, which is the model-state figure DeepSpeed's estimators give): the gradient
    reduction bucket of `reduce_bucket_size` elements in the gradient dtype, two of them with `overlap_comm`,
    allocated by stages 1-3 whatever the model size (measured on real 2-rank runs: exactly one bucket on CPU).
    Also outside `device_total` (DeepSpeed's code, measured on real 2-rank gpt2 runs to within 0.1%):
      `gathered`  stage 3: after a module runs, ZeRO-3 keeps its parameters gathered when the step's trace uses
                  them again within `stage3_max_reuse_distance` elements; a module's forward reuse comes after twice
                  the parameters that follow it, so at the end of the forward the last min(Ψ, R/2) parameters are
                  gathered (w B each); and while the largest layer runs, the prefetcher gathers up to
                  `stage3_prefetch_bucket_size` elements ahead. The larger of the two, beyond the estimator's
                  largest-layer working set.
      `staging`   ZeRO-1/2 optimizer offload: a device buffer of the largest parameter for gradient copies.
      `host`      besides the offloaded states: ZeRO-1/2 offload keeps a 16-bit copy of the rank's parameter
                  partition and a largest-parameter gradient buffer on the host; ZeRO-3 offload a second fp32
                  gradient partition.
    """
    half = precision in ("fp16", "bf16")
    n = max(world, 1)
    K = STATE_BYTES[optimizer]
    w = 2 if half else 4
    extra32 = 8 if half else 0  # fp32 master + fp32 grads
    params = n_params * w / (n if stage == 3 else 1)
    work = 4 * largest_layer_params if stage == 3 else 0
    if stage == 3:
        grads = 0.0  # module grads are transient; the fp32 partition is counted in the optimizer share
        opt = n_trainable * (8 + K) / n  # fp32 master + fp32 grad partition + state
    else:
        grads = n_trainable * w / (n if stage >= 2 else 1)
        if half:
            opt = n_trainable * (extra32 + K) / (n if stage >= 1 else 1)
        else:
            opt = n_trainable * ((4 if stage >= 1 else 0) + K) / (n if stage >= 1 else 1)
    host = 0.0
    if offload_optimizer:
        host += opt
        opt = 0.0
        if stage >= 2:
            host += grads
            grads = 0.0
    if offload_params:
        host += params
        params = 0.0
    buffers = reduce_bucket_size * w * (2 if overlap_comm and stage < 3 else 1) if stage >= 1 else 0
    kept = min(n_params, max(reuse_distance // 2, largest_layer_params + prefetch_bucket_size))
    gathered = max(0.0, w * kept - work) if stage == 3 else 0.0
    staging = 0.0
    if offload_optimizer and stage in (1, 2):
        staging = largest_param * w
        host += n_params / n * w + largest_param * w
    elif offload_optimizer and stage == 3:
        host += n_trainable / n * 4
    out = {"params": params + work, "grads": grads, "optimizer": opt, "host": host, "buffers": buffers,
           "gathered": gathered, "staging": staging}
    out["device_total"] = out["params"] + out["grads"] + out["optimizer"]
    return {k: int(v) for k, v in out.items()}


def largest_layer_params(model: torch.nn.Module) -> int:
    """Parameters of the largest leaf module (GPT-2: the tied embedding), as DeepSpeed's estimator defines it."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def zero_states_of(cfg: RunConfig, counts: dict[str, int], largest: tuple[int, int], zero_world: int,
                   kernel: str) -> dict:
    """`zero_model_states` for `cfg` with the DeepSpeed settings its run would use (`make_ds_config`, incl. a user
    `train.deepspeed_config`). `largest`: (largest layer, largest parameter), in elements."""
    mem = cfg.memory
    ds = make_ds_config(cfg, zero_world, "cuda" if kernel == "cuda" else "cpu",
                        load_user_ds_json(cfg.train.deepspeed_config))["zero_optimization"]
    return zero_model_states(counts["total"], counts["trainable"], mem.zero_stage, zero_world, mem.precision,
                             cfg.optim.name, mem.offload_optimizer, mem.offload_params, largest[0],
                             ds.get("reduce_bucket_size", 0), ds.get("overlap_comm", False), largest[1],
                             ds.get("stage3_max_reuse_distance", 1e9), ds.get("stage3_prefetch_bucket_size", 5e7))


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
    phase_peaks: dict[str, tuple[int, dict[str, int]]] = field(default_factory=dict)
    largest: tuple[int, int] = (0, 0)  # elements of the largest layer and the largest parameter

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def with_gpu_margin(self) -> int:
        return with_gpu_margin(self.peak_bytes)



def fake_step(optimizer) -> None:
    """An optimizer step on fake tensors. bitsandbytes kernels and torchao's compiled step cannot run on them:
    allocate their states exactly as their first step does and skip the quantized math (bitsandbytes' allocates
    nothing of size; torchao's is one fused kernel per parameter)."""
    module = type(optimizer).__module__
    if module.startswith("torchao"):
        from torchao.optim import subclass_4bit

        with unset_fake_temporarily():  # the quantization maps are computed from values once (and cached)
            subclass_4bit.get_qmap_signed(), subclass_4bit.get_qmap_unsigned()
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state[p]
                if p.grad is not None and len(state) == 0:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = optimizer._new_buffer(p, True)
                    state["exp_avg_sq"] = optimizer._new_buffer(p, False)
        return
    if not module.startswith("bitsandbytes"):
        optimizer.step()
        return
    for gindex, group in enumerate(optimizer.param_groups):
        for pindex, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if len(optimizer.state[p]) == 0:
                optimizer.init_state(group, p, gindex, pindex)


def fake_model(cfg: RunConfig, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """`build_model(cfg)` with fake CPU parameters: built on the meta device (no init compute, and no
    module `.to()` on fake tensors, which peft does and fake tensors refuse), then every parameter and
    buffer replaced by a fake tensor of the same shape/dtype (tied weights stay one tensor). Call inside
    a FakeTensorMode. `dtype` casts floating parameters (DeepSpeed's 16-bit module weights)."""
    with torch.device("meta"):
        model = build_model(cfg, 50257)
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                dt = dtype if (dtype is not None and p.is_floating_point()) else p.dtype
                made[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=dt, device="cpu"),
                                                 requires_grad=p.requires_grad)
                if getattr(p, "quant_state", None) is not None:  # a 4-bit weight (already fake, on the CPU)
                    made[id(p)].quant_state = p.quant_state
            module._parameters[name] = made[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device="cpu")
    return model


# ----------------------------------------------------------------------------- phases, for depth extrapolation


def _block_label(i: int, n: int, edge: int) -> str:
    """Blocks near either end keep their own label; the middle ones share one (memory there is linear in i)."""
    if n - 1 - i < edge:
        return f"top{n - 1 - i}"
    return f"bottom{i}" if i < edge else "mid"


def label_phases(model: torch.nn.Module, tracker: MemoryTracker, mem: MemoryConfig) -> list:
    """Hooks that name the phase the tracker is in: forward per block, the head, backward per block (a block's
    backward ends when its input's gradient is computed), the optimizer step. Within one label, memory is linear
    in the model's depth, which is what `simulate_deep` extrapolates. The blocks named apart from the middle ones
    (`edge` at each end) span one checkpointing period and one more."""
    edge = (mem.checkpoint_every_n_layers if mem.activation_checkpointing else 1) + 1
    lm = unwrap(model, through_peft=True)
    fam = family_of(lm)
    blocks, handles = list(fam.blocks(lm)), []
    n = len(blocks)

    def on_block(i: int):
        def hook(module, args):
            if in_backward():  # checkpoint recompute
                return
            tracker.phase = f"fwd:{_block_label(i, n, edge)}"
            h = args[0]
            if isinstance(h, torch.Tensor) and h.requires_grad:
                below = f"bwd:{_block_label(i - 1, n, edge)}" if i > 0 else "bwd:embeddings"

                def done(grad, below=below, last=i == 0):
                    tracker.bwd_phase = below
                    if last:
                        tracker.phase = "post-backward"

                h.register_hook(done)

        return hook

    def on_head(module, args, output):
        tracker.phase, tracker.bwd_phase = "fwd:head", f"bwd:head+{_block_label(n - 1, n, edge)}"

    handles += [b.register_forward_pre_hook(on_block(i)) for i, b in enumerate(blocks)]
    handles.append(fam.final_norm(lm).register_forward_hook(on_head))
    handles.append(fam.body(lm).register_forward_pre_hook(lambda m, a: setattr(tracker, "phase", "fwd:embeddings")))
    return handles


def _zero_adjust(breakdown: dict[str, int], zero: dict, grad_share: float) -> tuple[int, dict[str, int]]:
    """A single-device tracked moment -> one ZeRO rank: the full parameters the simulated run held are replaced by
    this rank's partition (and ZeRO-3's kept-gathered parameters), the optimizer partition (fp32 masters, fp32
    gradients, states) is added, gradients count `grad_share` of what the run held at that moment, and the reduce
    bucket (allocated in the run as "other") and the offload staging buffer are shown with the gradients.
    The kept-gathered parameters are counted at every moment: they are at their most at the end of the forward
    and the start of the backward, where ZeRO-3 peaks."""
    b = dict(breakdown)
    grads = int(b["gradients"] * grad_share) + b.get("other", 0) + zero["staging"]
    b.update(parameters=zero["params"] + zero["gathered"], gradients=grads, optimizer=zero["optimizer"], other=0)
    return sum(b.values()), b


def with_concrete_precision(cfg: RunConfig, kernel: str) -> RunConfig:
    """`memory.precision: auto` as a run on this machine resolves it: this CPU's answer for the CPU kernels, this
    GPU's for the CUDA kernels (without a GPU here, a CUDA prediction must say bf16 or fp16)."""
    if cfg.memory.precision != "auto":
        return cfg
    if kernel == "cuda" and not torch.cuda.is_available():
        raise ValueError("memory.precision=auto: no GPU here to resolve it for; say which precision the GPU runs "
                         "(memory.precision=bf16 or fp16)")
    precision, _ = resolve_precision("auto", torch.device(kernel))
    return cfg.updated({"memory.precision": precision})


def reduce_bucket(model: torch.nn.Module, tracker: MemoryTracker, zero: dict, stage: int) -> list[torch.Tensor]:
    """DeepSpeed's gradient reduction bucket(s), filed as "other": ZeRO-3 allocates them at start-up, ZeRO-1/2 when the
    first parameter's gradient is ready (`process_gradients` -> `setup_buckets`). The list holds the bucket."""
    bucket: list[torch.Tensor] = []
    if not zero["buffers"]:
        return bucket

    def allocate(*_):
        if not bucket:
            bucket.append(torch.empty(zero["buffers"], dtype=torch.uint8))
            tracker.tag(bucket[0], "other")

    if stage == 3:
        allocate()
    else:
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(allocate)
    return bucket


def simulate(cfg: RunConfig, kernel: str = "cpu", steps: int = 2, zero_world: int = 1,
             phases: bool = False) -> SimResult:
    """Peak memory of `steps` optimizer steps of `cfg` (one rank), simulated on fake tensors.

    Torch-backend configurations run the backend's `step_tensors`, the training step itself. DeepSpeed
    configurations run forward/backward on 16-bit module weights and take model states from
    `zero_model_states`.
    """
    if kernel not in ("cpu", "cuda"):
        raise ValueError(kernel)
    cfg = with_concrete_precision(cfg, kernel)
    t0 = time.perf_counter()
    mem = cfg.memory
    deepspeed = cfg.backend_for(zero_world) == "deepspeed"
    micro, seq = cfg.train.micro_batch_size, cfg.data.block_size
    notes, zero = [], None
    # One ZeRO rank: full parameters are replaced by partitions (rules, below); gradients as backward makes them:
    # kept whole up to stage 1, reduced into 1/N partitions from stage 2, moved to the host with optimizer offload.
    grad_share = (1.0 if mem.zero_stage <= 1 else 0.0 if mem.offload_optimizer else 1.0 / max(zero_world, 1))
    tracker = MemoryTracker(round_to=CUDA_BLOCK if kernel == "cuda" else 1,
                            weights={"parameters": 0, "gradients": grad_share} if deepspeed else None)
    # Token ids are real tensors (their count is read on the host); everything else is fake.
    vocab = min(cfg.model.architecture()[1]["vocab_size"], 50257)
    x = torch.randint(0, vocab, (micro, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": x, "labels": x, "n_tokens": micro * (seq - 1)}
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode, fake_tensors_are_no_trace():
        model = fake_model(cfg, DTYPES[mem.precision] if deepspeed else None)  # DeepSpeed: 16-bit module weights
        if kernel == "cuda":
            model.config._attn_implementation = _register_standin()
        counts = parameter_counts(model)
        largest = (largest_layer_params(model), max(p.numel() for p in model.parameters()))
        backend = None
        if deepspeed:
            model.train()
            zero = zero_states_of(cfg, counts, largest, zero_world, kernel)
        else:
            # Optimizer constructors may compute real constants (bitsandbytes' quantization maps).
            with unset_fake_temporarily():
                backend = single_device_backend(cfg, DistEnv(), model, total_steps=steps, values=False,
                                                optimizer_step=fake_step)
            opts = backend.optimizers()
            model = backend.model
        tracker.track_model(model)
        if phases:
            label_phases(model, tracker, mem)
        with tracker, warnings.catch_warnings():
            bucket = reduce_bucket(model, tracker, zero, mem.zero_stage) if zero else []
            # the bitsandbytes step is replaced by state allocation, so LambdaLR sees no optimizer.step() and warns
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            for _ in range(steps):
                if backend is not None:
                    backend.step_tensors([batch] * (1 if mem.optimizer_in_backward else cfg.train.grad_accum_steps))
                    for opt in opts:
                        tracker.track_optimizer(opt)
                else:
                    # DeepSpeed: forward/backward on the 16-bit module weights; model states come from the rules.
                    for _ in range(cfg.train.grad_accum_steps):
                        loss_sum, n = lm_loss_sum(model, batch, mem.loss_chunk_size)
                        (loss_sum / n).backward()
                        del loss_sum, n
                    model.zero_grad(set_to_none=True)
                    if mem.zero_stage < 3:
                        bucket.clear()  # ZeRO-1/2 drop the bucket after the step
    if zero is not None:
        peak, breakdown = _zero_adjust(tracker.peak_breakdown, zero, grad_share)
        phase_peaks = {k: _zero_adjust(b, zero, grad_share) for k, (_, b) in tracker.phase_peaks.items()}
        notes.append("ZeRO model states from partitioning rules; activations simulated on one device")
    else:
        peak, breakdown, phase_peaks = tracker.peak, dict(tracker.peak_breakdown), dict(tracker.phase_peaks)
    return SimResult(peak, breakdown, kernel, counts, time.perf_counter() - t0, zero, notes, phase_peaks, largest)


def simulate_deep(cfg: RunConfig, kernel: str = "cpu", steps: int = 2, zero_world: int = 1) -> SimResult:
    """`simulate` for a deep model in a fraction of the time: two shallow models (L1 and L1 + k blocks, k the
    checkpointing period) are simulated with phase labels, each phase's peak and breakdown is extrapolated
    linearly to the real depth, and the largest phase is the peak. Exactness is tested against full simulations."""
    cfg = with_concrete_precision(cfg, kernel)
    fam, arch = cfg.model.architecture()
    n = fam.shape(arch).n_layer
    k = cfg.memory.checkpoint_every_n_layers if cfg.memory.activation_checkpointing else 1
    # Every phase label present, and the same checkpointing pattern from the top block down as at depth n.
    l1 = 2 * (k + 1) + 2
    l1 += (n - l1) % k
    l2 = l1 + k
    if n <= l2:
        return simulate(cfg, kernel, steps, zero_world, phases=True)
    t0 = time.perf_counter()
    runs = []
    for depth in (l1, l2):
        shallow = cfg.model_copy(deep=True)
        shallow.model.n_layer = depth
        runs.append(simulate(shallow, kernel, steps, zero_world, phases=True))
    a, b = runs

    def line(x1: int, x2: int) -> int:
        return x1 + (x2 - x1) * (n - l1) // (l2 - l1)

    counts = {c: line(a.params[c], b.params[c]) for c in a.params}
    # ZeRO states are computed at the real depth: ZeRO-3's kept-gathered parameters saturate (min(Ψ, R/2)).
    zero = zero_states_of(cfg, counts, a.largest, zero_world, kernel) if a.zero else None
    phases = {}
    for key in a.phase_peaks.keys() & b.phase_peaks.keys():
        (t1, b1), (t2, b2) = a.phase_peaks[key], b.phase_peaks[key]
        phases[key] = (line(t1, t2), {c: line(b1[c], b2[c]) for c in b1})
        if zero:
            phases[key][1].update(parameters=zero["params"] + zero["gathered"], optimizer=zero["optimizer"])
            phases[key] = (sum(phases[key][1].values()), phases[key][1])
    key = max(phases, key=lambda p: phases[p][0])
    return SimResult(phases[key][0], phases[key][1], kernel, counts, time.perf_counter() - t0, zero,
                     a.notes + [f"extrapolated from {l1} and {l2} blocks; peak in {key}"], phases, a.largest)
