"""`engine plan`: which configurations fit a GPU (and the host's RAM), and which of them is fastest.

Memory comes from the validated simulation, not from rules of thumb: for every combination of how model states
are held (optimizer, in-backward stepping, ZeRO/offload) and how activations are held (checkpointing every k
blocks, chunked loss), `simulate_deep` runs the engine's own step on fake tensors for shallow models at
micro-batch 1 and 2 (and 2 accumulation steps when the plan accumulates), and records the peak of every phase
of the step. Within a phase memory is linear in depth and in micro-batch, so any micro-batch is predicted from
those figures (`peak_from_figures`, a pure function); the recommended configuration is then simulated once
more directly, and where that disagrees the next one in order is, until one fits (`recommend`). GPU predictions add
`GPU_OVERHEAD` (CUDA context, fragmentation). The candidates are recipes of engine/recipes.py (`CANDIDATES`).

Host RAM and step time are modelled (stated assumptions below), not simulated.
"""

from __future__ import annotations

import functools
import math
import os
import re
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import yaml

from engine.config import (
    ModelConfig,
    deep_merge,
    load_config,
    needs_deepspeed,
    nest,
    parse_override,
)
from engine.errors import ConfigError
from engine.families import Shape
from engine.memory.gpus import GPU, GPUS
from engine.memory.measure import flops_per_token
from engine.memory.simulate import compiled_bound, simulate_deep, with_gpu_margin
from engine.notices import library_log_path, workers_log_to
from engine.recipes import CATALOG, Recipe, checkpointing, chunked_loss

GIB = 2**30

# --- modelled costs (assumptions, not measurements on a GPU) ---------------------------------------------------
# Host process without tensors: Python + torch + transformers + deepspeed imported, CUDA runtime on the host.
HOST_BASE_BYTES = int(2.5 * GIB)
# Effective host<->device copy rate (PCIe 3.0 x16 with pinned buffers; a T4 is PCIe 3.0 x16).
PCIE_BYTES_PER_S = 12e9
# DeepSpeedCPUAdam parameter updates per second on a 2-core host like Colab's: measured on this machine's 2 cores
# (benchmarks/cpu_adam_rate.py -> benchmarks/results/cpu_adam_rate.json: 1.21e9).
CPU_ADAM_PARAMS_PER_S = 1.2e9
# Fraction of the GPU's dense 16-bit peak a GPT-2 step reaches (only ratios matter; it cancels out of them).
ASSUMED_MFU = 0.4
# Step time with every block checkpointed, over the same step without checkpointing, by checkpoint policy; and with
# compiled blocks (train.compile_blocks), over the same step eager, by policy ("none": no checkpointing). Measured on
# the 2-core Xeon (AMX): benchmarks/results/speed_options (gpt2, 2 x 512, fp32; tokens/s of one row over another's,
# one run); tests/test_plan.py holds them to that file. Assumed to hold on GPUs, where they are not measured yet
# (benchmarks/gpu_check.py has the rows): there the fused attention kernels make selective recompute cheaper still.
RECOMPUTE_TIME = {"full": 1.33, "selective": 1.35}
COMPILE_TIME = {"none": 1.12, "full": 0.95, "selective": 0.87}


def parse_size(text: str) -> int:
    """'16GiB', '16GB', '16G', '15360MiB', '12.5gb' -> bytes (GB and G are read as GiB, like nvidia-smi's GB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not m:
        raise ConfigError(f"cannot read the size {text!r}: write e.g. 16GiB, 12GB or 15360MiB")
    unit = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2)]
    if not m.group(2) and not m.group(3):
        unit = 2**30  # a bare number is GiB
    return int(float(m.group(1)) * unit)


@dataclass(frozen=True)
class Request:
    model: str = "gpt2-xl"
    gpu: GPU = GPUS["t4"]
    gpus: int = 1
    host_bytes: int | None = None
    seq_len: int = 1024
    global_batch: int | None = None  # None: no accumulation, the micro-batch is the batch
    lora: bool = False
    max_micro: int = 64
    clip_in_backward: str = "stale"  # optim.clip_in_backward for the in-backward candidates (exact: two passes)
    compile_blocks: bool = False  # plan with train.compile_blocks (not under ZeRO-3, which it cannot compile)
    fused_head_loss: bool = False  # plan with memory.fused_head_loss where the loss is unchunked (not under ZeRO-3)


@dataclass(frozen=True)
class Strategy:
    """How model states are held: a catalog recipe (engine/recipes.py, built by `candidate`) as the plan uses it."""

    name: str
    overrides: tuple[str, ...]
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    in_backward: bool = False
    quality_rank: int = 0  # among equally fast candidates the lower wins (Recipe.quality_rank)
    quality: str = ""  # its measured quality gaps (quality_note), printed with a recommendation
    quality_over: float | None = None  # its largest gap where it misses QUALITY_TOLERANCE_PCT: marked in the table


# Final validation loss of each recipe (by its Recipe.quality_key, also its name in benchmarks/quality.py) against
# fp32 AdamW clipped at 1.0 (QLoRA: against LoRA, what the NF4 base costs), measured by benchmarks/quality.py on the
# 2-core Xeon (AMX) on 2026-12-03: a 4-layer, 128-wide model pretrained by the engine on the sample stories,
# fine-tuned 150 steps in each of QUALITY_CELLS - Python docstrings (docs) and Python source (code: the hard shift,
# new vocabulary), at the presets' lr (1e-5; adapters 2e-4) and a high one (5e-4; adapters 2.5e-3) - mean of 3 seeds
# each; once as a GPT-2 (`--size small`) and once as a Qwen2 (`--size small-qwen2`).
QUALITY_CELLS = ("docs/preset lr", "docs/high lr", "code/preset lr", "code/high lr")


@dataclass(frozen=True)
class QualityGrid:
    measured_on: str  # what the note names
    results: str  # where the figures are
    gaps: dict[str, tuple[float | None, ...]]  # quality key -> % per QUALITY_CELLS (None: not measured)


QUALITY_GRIDS = {
    "gpt2": QualityGrid("a small GPT-2", "benchmarks/results/quality/small/results.md", {
        "adamw_8bit_inb": (0.03, -0.13, -0.09, -0.65),  # 8-bit AdamW in backward, stale clipping
        "bf16_8bit": (0.07, -0.15, -0.07, -0.73),
        "bf16_4bit": (1.75, -0.18, 3.55, 0.41),  # at the presets' lr it moves less than AdamW (every seed, from step 50)
        "bf16_adafactor": (0.29, -0.68, -0.12, -3.19),
        "lora": (-4.64, 33.23, -6.67, 131.0),  # new vocabulary needs token embeddings, which LoRA keeps frozen
        "qlora": (0.0, 0.0, 0.0, -0.20),  # against LoRA
    }),
    "qwen2": QualityGrid("a small Qwen2", "benchmarks/results/quality/small-qwen2/results.md", {
        "adamw_8bit_inb": (0.06, -0.27, -0.04, -1.07),
        "bf16_8bit": (0.04, -0.26, -0.03, -1.05),
        "bf16_adafactor": (0.45, -0.54, -0.05, -1.94),
        "lora": (-4.50, 34.43, -4.49, 140.41),  # as on GPT-2: frozen token embeddings cannot learn the new vocabulary
        "qlora": (0.02, 0.04, -0.08, -0.02),  # against LoRA
    }),
}
# A family without a grid of its own reads the nearest one measured: Llama's block is Qwen2's (RMSNorm, rotary,
# SwiGLU) without the q/k/v bias; GPT-NeoX's is LayerNorm + GELU like GPT-2's.
QUALITY_NEAREST = {"llama": "qwen2", "gpt_neox": "gpt2"}
QUALITY_AGAINST = {"qlora": "LoRA"}
QUALITY_TOLERANCE_PCT = 1.0


def quality_grid(model_type: str = "gpt2") -> tuple[QualityGrid, bool]:
    """The quality grid that speaks for a family, and whether it was measured on that family itself."""
    own = model_type in QUALITY_GRIDS
    return QUALITY_GRIDS[model_type if own else QUALITY_NEAREST.get(model_type, "gpt2")], own


def quality_worst(key: str, model_type: str = "gpt2") -> tuple[float, str] | None:
    """The largest measured gap of a recipe and the cell it was measured in, or None if it was not measured."""
    cells = [(g, c) for g, c in zip(quality_grid(model_type)[0].gaps.get(key, ()), QUALITY_CELLS) if g is not None]
    return max(cells) if cells else None


def quality_note(key: str, model_type: str = "gpt2") -> str:
    """The measured quality gaps of the recipe whose quality key is `key`, as printed with a recommendation for a
    model of `model_type`."""
    worst = quality_worst(key, model_type)
    if worst is None:
        return ""
    grid, own = quality_grid(model_type)
    against = QUALITY_AGAINST.get(key, "fp32 AdamW clipped at 1.0")
    verdict = (f"within {QUALITY_TOLERANCE_PCT:g}% in every cell" if worst[0] <= QUALITY_TOLERANCE_PCT
               else f"OVER {QUALITY_TOLERANCE_PCT:g}%: {worst[0]:+.2f}% ({worst[1]})")
    cells = "; ".join(f"{c} {g:+.2f}%" for g, c in zip(grid.gaps[key], QUALITY_CELLS) if g is not None)
    where = grid.measured_on + ("" if own else f", the nearest family measured to {model_type}")
    return f"final validation loss vs {against} {verdict} ({cells}; benchmarks/quality.py, {where}, 3 seeds)"


@dataclass(frozen=True)
class ActivationChoice:
    name: str
    checkpoint_every: int | None  # None: no checkpointing
    chunked_loss: bool
    policy: str = "full"  # memory.checkpoint_policy of the checkpointed blocks

    def time_factor(self, compiled: bool) -> float:
        """Measured step-time factor of this way of holding activations (RECOMPUTE_TIME for the checkpointed
        fraction of blocks) and, `compiled`, of compiling the blocks with it (COMPILE_TIME)."""
        factor = 1.0 + (RECOMPUTE_TIME[self.policy] - 1.0) / self.checkpoint_every if self.checkpoint_every else 1.0
        return factor * (COMPILE_TIME[self.policy if self.checkpoint_every else "none"] if compiled else 1.0)


@dataclass
class Row:
    strategy: Strategy
    activations: ActivationChoice
    micro: int
    accum: int
    gpu_bytes: int  # per rank, with the GPU margin
    host_bytes: int
    relative_time: float
    fits: bool
    reason: str
    breakdown: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.strategy.name} | {self.activations.name}"


# The planner's candidates by catalog key (engine/recipes.py), in table order: (LoRA, more than one GPU) -> keys.
CANDIDATES: dict[tuple[bool, bool], tuple[str, ...]] = {
    (False, False): ("adamw", "adamw_8bit", "adamw_inb", "adamw_8bit_inb", "bf16_8bit", "bf16_4bit", "bf16_adafactor",
                     "zero2_offload", "zero3_offload_all"),
    (False, True): ("zero1_adamw", "zero2_adamw", "zero2_adamw_8bit", "zero3_adamw", "zero2_offload", "zero3_offload",
                    "zero3_offload_all"),
    (True, False): ("lora", "qlora"),
    (True, True): ("lora_zero2",),
}


def candidate(r: Recipe, model_type: str = "gpt2") -> Strategy:
    """A catalog recipe as a planner candidate, with its quality note as measured for `model_type`'s family."""
    worst = quality_worst(r.quality_key, model_type)
    over = worst[0] if worst is not None and worst[0] > QUALITY_TOLERANCE_PCT else None
    return Strategy(r.title, r.overrides, r.zero_stage, r.offload_optimizer, r.offload_params, r.in_backward,
                    r.quality_rank, quality_note(r.quality_key, model_type), over)


def strategies(req: Request) -> list[Strategy]:
    """How model states can be held for this request: the catalog's recipes for LoRA or not, one GPU or several
    (with compiled blocks, none under ZeRO-3: its parameter gathering breaks the compiled graph)."""
    model_type = model_family_and_shape(req.model)[0]
    out = [candidate(CATALOG[key], model_type) for key in CANDIDATES[(req.lora, req.gpus > 1)]]
    return [s for s in out if not (req.compile_blocks and s.zero_stage == 3)]


def activation_choices(strategy: Strategy) -> list[ActivationChoice]:
    chunk_ok = strategy.zero_stage != 3  # the chunked loss re-enters lm_head, which ZeRO-3 partitions
    out = [ActivationChoice("no checkpointing", None, False)]
    if chunk_ok:
        out.append(ActivationChoice("chunked loss", None, True))
    for k in (4, 2, 1):
        name = "checkpoint all blocks" if k == 1 else f"checkpoint 1 block in {k}"
        out.append(ActivationChoice(name + (" + chunked loss" if chunk_ok else ""), k, chunk_ok))
    # Selective recompute sits between none and full: every block checkpointed, its matmul outputs kept.
    out.append(ActivationChoice("selective recompute" + (" + chunked loss" if chunk_ok else ""), 1, chunk_ok,
                                "selective"))
    return out


def loss_chunk_tokens(seq_len: int, vocab: int) -> int:
    """The chunked loss's tokens per chunk: one sequence for a GPT-2-sized vocabulary (<= 2^16), fewer for a larger
    one (Llama 3's 128k, Qwen2's 152k), in multiples of 64, so a chunk's logits stay within what a sequence of
    GPT-2's make."""
    if vocab <= 2**16:
        return seq_len
    return max(64, seq_len * 2**16 // vocab // 64 * 64)


def config_overrides(req: Request, s: Strategy, a: ActivationChoice, micro: int, accum: int) -> list[str]:
    """The engine settings of one candidate (model name as given, pretrained weights)."""
    precision = "bf16" if req.gpu.bf16 else "fp16"
    ov = [f"model.name={req.model}", f"data.block_size={req.seq_len}", f"memory.precision={precision}",
          f"train.micro_batch_size={micro}", f"train.grad_accum_steps={accum}", *s.overrides]
    ov.append(f"train.backend={'deepspeed' if needs_deepspeed(s.zero_stage, req.gpus) else 'torch'}")
    if a.checkpoint_every:
        ov += checkpointing(a.checkpoint_every, a.policy)
    if a.chunked_loss:
        ov += chunked_loss(loss_chunk_tokens(req.seq_len, model_shape(req.model).vocab))
    elif req.fused_head_loss and s.zero_stage != 3:  # (ZeRO-3 gathers the head in hooks the fused loss bypasses)
        ov.append("memory.fused_head_loss=true")
    if s.in_backward and req.clip_in_backward != "stale":
        ov.append(f"optim.clip_in_backward={req.clip_in_backward}")
    if req.compile_blocks:
        ov.append("train.compile_blocks=true")
    return ov


# --- memory figures: simulated once per (strategy, activations, accumulating) ------------------------------------

Figures = dict[str, tuple[tuple[int, dict], tuple[int, dict] | None]]  # phase -> ((peak, breakdown) at micro 1, at 2)


def simulate_phases(req: Request, s: Strategy, a: ActivationChoice, micro: int, accumulating: bool) -> tuple[dict, dict]:
    """Per-phase (peak, breakdown) of one candidate at `micro` (GPU kernels, one rank), and parameter counts."""
    ov = config_overrides(req, s, a, micro, 2 if accumulating else 1) + ["model.init=random"]
    sim = simulate_deep(load_config(None, ov), kernel="cuda", zero_world=req.gpus)
    return sim.phase_peaks, {"params": sim.params, "zero_host": (sim.zero or {}).get("host", 0)}


def peak_from_figures(figs: Figures, micro: int) -> tuple[int, dict[str, int], str]:
    """Peak bytes at `micro` (before the GPU margin): every phase is affine in the micro-batch; the largest wins.
    (Figures without micro-batch 2, when micro-batch 1 did not fit, only answer for micro-batch 1.)"""
    best = None
    for phase, (first, second) in figs.items():
        (p1, b1), (p2, b2) = first, (second if second is not None else first)
        if second is None and micro != 1:
            raise ValueError("no micro-batch-2 figures")
        total = p1 + (p2 - p1) * (micro - 1)
        if best is None or total > best[0]:
            best = (total, {c: b1[c] + (b2[c] - b1[c]) * (micro - 1) for c in b1}, phase)
    return best


def with_margin(req: Request, peak: int) -> int:
    """A candidate's predicted GPU bytes: its simulated peak (bounded for compiled blocks) plus the GPU margin."""
    return with_gpu_margin(compiled_bound(peak, req.compile_blocks))


# --- host RAM and step time: modelled ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def model_family_and_shape(model: str) -> tuple[str, Shape]:
    """The family (`model_type`) and architecture of `engine plan --model` (a named size, or a model folder whose
    config.json is read once, not per candidate) as the simulation builds it."""
    fam, arch = ModelConfig(name=model, init="random").architecture()
    return fam.model_type, fam.shape(arch)


def model_shape(model: str) -> Shape:
    return model_family_and_shape(model)[1]


def host_bytes(n_params: int, zero_host: int, lora: bool) -> int:
    """Peak host RAM: the process, the model materialised in fp32 on the host before it moves to the GPU (4 B/param;
    DeepSpeed builds its host-side partitions while that copy still exists), and the offloaded states
    (fp32 master, gradients and Adam moments: `zero_model_states(...)["host"]`)."""
    return HOST_BASE_BYTES + 4 * n_params + zero_host


def step_seconds_per_token(req: Request, s: Strategy, a: ActivationChoice, n_params: int, tokens_per_step: int,
                           micro_steps: int) -> float:
    """Modelled time per token: compute at ASSUMED_MFU of the GPU's peak (+ the LM head again for the chunked loss,
    and exact clipping's measuring pass: twice the compute, measured 1.8x the time on the CPU,
    benchmarks/results/clip_in_backward), times the measured factor of recompute and compiled blocks
    (`ActivationChoice.time_factor`), host<->device copies for offload at PCIE_BYTES_PER_S, and DeepSpeedCPUAdam on
    the host."""
    shape = model_shape(req.model)
    fpt = flops_per_token(n_params, shape.n_layer, shape.hidden, req.seq_len, lora=req.lora)
    if a.chunked_loss:
        fpt += 2 * shape.vocab * shape.hidden  # lm_head forward again in backward
    if s.in_backward and req.clip_in_backward == "exact":
        fpt *= 2  # a measuring forward+backward (with its recompute) before the stepping one
    seconds = fpt * tokens_per_step / (req.gpu.peak_tflops * 1e12 * ASSUMED_MFU) * a.time_factor(req.compile_blocks)
    shard = n_params / req.gpus
    if s.offload_optimizer:
        seconds += 4 * shard / PCIE_BYTES_PER_S  # 16-bit gradients down, 16-bit parameters up, once per step
        seconds += shard / CPU_ADAM_PARAMS_PER_S
    if s.offload_params:
        passes = 2 + (1 if a.checkpoint_every else 0)  # forward, backward, recompute
        seconds += micro_steps * passes * 2 * n_params / PCIE_BYTES_PER_S
    return seconds / tokens_per_step


# --- the plan ----------------------------------------------------------------------------------------------------


def micro_batches(req: Request, in_backward: bool) -> list[tuple[int, int]]:
    """(micro, accum) pairs that reach the global batch (or, without one, micro-batches with no accumulation)."""
    if req.global_batch is None:
        return [(m, 1) for m in (1, 2, 4, 8, 16, 32, 64) if m <= req.max_micro]
    per_rank = req.global_batch // req.gpus
    if per_rank * req.gpus != req.global_batch:
        raise ConfigError(f"--global-batch {req.global_batch} is not a multiple of --gpus {req.gpus}")
    pairs = [(m, per_rank // m) for m in range(1, min(per_rank, req.max_micro) + 1) if per_rank % m == 0]
    return [(m, acc) for m, acc in pairs if not (in_backward and acc > 1)]


def evaluate(req: Request, s: Strategy, a: ActivationChoice, figs: Figures, info: dict) -> Row:
    """The best row of one (strategy, activations): the largest micro-batch that fits (pure, from figures)."""
    n_params = info["params"]["total"]
    host = host_bytes(n_params, info["zero_host"], req.lora)
    pairs = micro_batches(req, s.in_backward)
    if not pairs:
        return Row(s, a, 0, 0, 0, host, math.inf, False,
                   "steps inside backward, so it cannot accumulate to the global batch: no micro-batch fits in one step")
    best, smallest = None, None
    for micro, accum in pairs:
        peak, breakdown, _ = peak_from_figures(figs, micro)
        gpu = with_margin(req, peak)
        tokens = micro * accum * req.gpus * req.seq_len
        t = step_seconds_per_token(req, s, a, n_params, tokens, accum)
        row = Row(s, a, micro, accum, gpu, host, t, True, "", breakdown)
        if smallest is None:
            smallest = row
        if gpu > req.gpu.memory_bytes:
            break  # memory grows with the micro-batch: no larger one fits either
        best = row
    if best is None:
        smallest.fits = False
        smallest.reason = (f"needs {smallest.gpu_bytes / GIB:.1f} GiB per GPU at micro-batch {smallest.micro} "
                           f"(has {req.gpu.memory_bytes / GIB:.1f})")
        best = smallest
    if req.host_bytes is not None and host > req.host_bytes:
        best.fits = False
        best.reason = "; ".join(r for r in (best.reason, f"needs {host / GIB:.1f} GiB host RAM "
                                                         f"(has {req.host_bytes / GIB:.1f})") if r)
    return best


def preference(row: Row) -> tuple:
    """The order of recommendation: the fastest first; ties go to the better optimizer (`quality_rank`), then the
    larger micro-batch (better GPU utilisation, not modelled)."""
    return round(row.relative_time, 12), row.strategy.quality_rank, -row.micro


def choose(rows: list[Row]) -> Row | None:
    """The preferred fitting row (`preference`), or None."""
    fitting = [r for r in rows if r.fits]
    return min(fitting, key=preference) if fitting else None


def recommend(rows: list[Row], check: Callable[[Row], Row]) -> Row | None:
    """The first row, in `choose`'s order, that still fits after `check` (`verify`: its direct simulation, which
    marks a row that does not fit); None when none does. The figures are extrapolated, so the direct simulation
    has the last word: a row it rejects is never recommended, however many are tried."""
    for row in sorted((r for r in rows if r.fits), key=preference):  # stable: ties keep `choose`'s pick first
        if check(row).fits:
            return row
    return None


def normalise_times(rows: list[Row]) -> None:
    """Relative step time: per-token time over the fastest candidate's without recompute or offload."""
    ref = min((r.relative_time for r in rows if r.relative_time < math.inf), default=1.0)
    for r in rows:
        r.relative_time = r.relative_time / ref if r.relative_time < math.inf else math.inf


def _phases_job(job: tuple) -> tuple[dict, dict]:
    warnings.filterwarnings("ignore")
    return simulate_phases(*job)


def gather_figures(req: Request, progress=None, workers: int | None = None, every_micro: bool = False) -> list[dict]:
    """Simulated figures of every (strategy, activations) candidate: the slow part of a plan. Micro-batch 1 first;
    micro-batch 2 only where a larger micro-batch can fit (or `every_micro`, to record figures for any budget).
    Simulations run in `workers` processes (default: one per CPU core, at most 4): independent, single-threaded."""
    combos = [(s, a) for s in strategies(req) for a in activation_choices(s)]
    # With a global batch the plan accumulates (unless it steps in backward): figures then come from a 2-step
    # accumulation, whose peak (gradients alive during the next forward) holds for any longer accumulation.
    accumulating = req.global_batch is not None and any(acc > 1 for _, acc in micro_batches(req, False))
    acc = {s.name: accumulating and not s.in_backward for s, _ in combos}
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    # Worker processes send their stderr (the libraries' import-time notices) to the engine's log (notices.py).
    with workers_log_to(library_log_path()):
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn")) if workers > 1 else None
        run = pool.map if pool else map
        try:
            first = list(run(_phases_job, [(req, s, a, 1, acc[s.name]) for s, a in combos]))
            need2 = []
            for (s, a), (phases, _) in zip(combos, first):
                pairs = micro_batches(req, s.in_backward)
                fits1 = with_margin(req, max(p for p, _ in phases.values())) <= req.gpu.memory_bytes
                need2.append(every_micro or (bool(pairs) and (pairs[0][0] > 1 or (fits1 and len(pairs) > 1))))
                if progress and not need2[-1]:
                    progress(s, a)
            jobs2 = [(req, s, a, 2, acc[s.name]) for (s, a), n in zip(combos, need2) if n]
            second = iter(run(_phases_job, jobs2))
            out = []
            for (s, a), (phases, info), n in zip(combos, first, need2):
                two = next(second)[0] if n else {}
                if n and progress:
                    progress(s, a)
                figs = {k: (phases[k], two[k] if n else None) for k in phases if not n or k in two}
                out.append({"strategy": s.name, "activations": a.name, "figures": figs, "info": info})
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)
    return out


def rows_from_figures(req: Request, figures: list[dict]) -> tuple[list[Row], Row | None]:
    """Every candidate's best row and the recommended one, from gathered (or recorded) figures: pure."""
    by_name = {(s.name, a.name): (s, a) for s in strategies(req) for a in activation_choices(s)}
    rows = []
    for rec in figures:
        if req.compile_blocks and (rec["strategy"], rec["activations"]) not in by_name:
            continue  # recorded figures of a ZeRO-3 candidate, which compiled plans leave out
        s, a = by_name[(rec["strategy"], rec["activations"])]
        figs = {k: tuple(None if x is None else (int(x[0]), dict(x[1])) for x in v) for k, v in rec["figures"].items()}
        rows.append(evaluate(req, s, a, figs, rec["info"]))
    normalise_times(rows)
    return rows, choose(rows)


def plan(req: Request, progress=None, workers: int | None = None) -> tuple[list[Row], Row | None]:
    return rows_from_figures(req, gather_figures(req, progress, workers))


def verify(req: Request, row: Row) -> Row:
    """Simulate the chosen configuration itself (its micro-batch and accumulation) and replace the figures."""
    ov = config_overrides(req, row.strategy, row.activations, row.micro, min(row.accum, 2)) + ["model.init=random"]
    sim = simulate_deep(load_config(None, ov), kernel="cuda", zero_world=req.gpus)
    row.gpu_bytes, row.breakdown = with_margin(req, sim.peak_bytes), dict(sim.breakdown)
    if row.gpu_bytes > req.gpu.memory_bytes:
        row.fits = False
        row.reason = f"the direct simulation needs {row.gpu_bytes / GIB:.2f} GiB per GPU"
    return row


def write_config(req: Request, row: Row, path) -> None:
    """The recommended configuration as a YAML file `engine train --config FILE` accepts unchanged."""
    tree: dict = {}
    for item in config_overrides(req, row.strategy, row.activations, row.micro, row.accum):
        tree = deep_merge(tree, nest(*parse_override(item)))
    tree.setdefault("logging", {})["output_dir"] = f"runs/{req.model}_plan"
    head = [
        f"# Written by `engine plan`: {req.model}, {req.gpus} x {req.gpu.name} ({req.gpu.memory_mib:,} MiB)"
        + (f", {req.host_bytes / GIB:.0f} GiB host RAM" if req.host_bytes else "") + f", sequence {req.seq_len}.",
        f"# Predicted (simulated) peak per GPU {row.gpu_bytes / GIB:.2f} GiB incl. the GPU margin; host RAM "
        f"{row.host_bytes / GIB:.1f} GiB (modelled); relative step time x{row.relative_time:.2f} (modelled).",
        "# Give your data with data.train_file=... (unset: the shipped sample corpus).",
    ] + ([f"# Quality: {row.strategy.quality}."] if row.strategy.quality else [])
    Path(path).write_text("\n".join(head) + "\n" + yaml.safe_dump(tree, sort_keys=False))


def format_table(rows: list[Row], chosen: Row | None) -> str:
    w = max(len(r.name) for r in rows) + 1
    head = f" {'configuration':{w}s} {'micro x acc':>11s} {'GPU GiB':>8s} {'host GiB':>8s} {'time':>6s}  verdict"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (not r.fits, r.relative_time)):
        mark = "*" if r is chosen else " "
        micro = f"{r.micro} x {r.accum}" if r.micro else "-"
        t = f"x{r.relative_time:.2f}" if r.relative_time < math.inf else "-"
        verdict = "fits" if r.fits else f"no: {r.reason}"
        if r.strategy.quality_over is not None:
            verdict += f" [quality: {r.strategy.quality_over:+.1f}% loss]"
        lines.append(f"{mark}{r.name:{w}s} {micro:>11s} {r.gpu_bytes / GIB:8.2f} {r.host_bytes / GIB:8.1f} {t:>6s}  {verdict}")
    return "\n".join(lines)
