"""Which device a run uses and what it can do: CUDA or CPU, native bf16, the precision `auto` stands for.

Capabilities are probed at run time, never assumed: CPU models differ between machines (some have AMX or
avx512-bf16 and multiply bf16 matrices several times faster than fp32, most do not), and GPUs differ too
(a T4 or V100 has no bf16, Ampere and newer have).
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import torch

from engine.errors import ConfigError

# CPU features with which bf16 matmuls run natively (oneDNN's AMX tiles or AVX512-BF16 dot products).
CPU_BF16_FEATURES = ("amx_bf16", "avx512_bf16")


# glibc's mallopt parameters: blocks of at least M_MMAP_THRESHOLD bytes are mmapped (and unmapped when freed); at
# most M_MMAP_MAX blocks are mmapped at once; free memory above M_TRIM_THRESHOLD at the heap's top goes back to the OS.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
HOST_MMAP_THRESHOLD = 1 << 20
NEVER_TRIM = 2**31 - 1  # mallopt takes a C int: the largest (2 GiB); glibc's own default is 128 KiB


def return_freed_host_memory(release: bool = True) -> bool:
    """`memory.release_host_memory`: with `release`, make freed host blocks of 1 MiB and more go back to the OS at
    once (Linux, glibc); without, leave glibc's own behaviour.

    glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB), after which blocks of
    that size come from the heap and stay with the process when freed: host RAM then holds every size of temporary
    a step ever freed. That was the gap between tracked tensors and process RSS: a gpt2-medium step (bf16 weights,
    Adafactor in backward) measured 3.85 GiB peak RSS for 1.12 GiB of tensors, 1.57 GiB with the threshold fixed at
    1 MiB (this call). The cost: every large host allocation then page-faults; a gpt2 fp32 CPU step took 4.86 s
    instead of 3.87 s (2-core Xeon, 2026-12-03). A fixed threshold turns the adjustment off. Returns whether it was
    set (False without `release`, on other platforms or C libraries)."""
    if not release or not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def keep_freed_host_memory(keep: bool = True) -> bool:
    """`memory.keep_host_memory`: with `keep`, every host block comes from glibc's heap and freed ones stay there
    for the next allocation (no mmap, no trimming); without, leave glibc's own behaviour.

    glibc mmaps every block above its threshold (at most 32 MiB, however it adapts), and a fresh mmapped block
    page-faults on first touch: a CPU training step allocates its largest tensors (gpt2's 1024 x 50257 logits and
    their gradients, 196 MiB each in fp32; the vocab x hidden weight gradient) afresh every step, and faulting them
    in costs about as much time per byte as a memory-bound op. Kept, a gpt2 fp32 CPU step ran at 1.12x the tokens/s
    (2-core Xeon, 2026-12-04, benchmarks/results/cpu_speed_options). The cost: the process keeps its high-water mark
    of host RAM (+346 MiB of peak RSS there; freed memory is not returned until exit). mallopt takes a C int, so the
    trim threshold is at most 2 GiB: free memory above that at the heap's top still goes back. Returns whether it was set (False
    without `keep`, on other platforms or C libraries)."""
    if not keep or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
    except (OSError, AttributeError):
        return False


def pick_device(pref: str) -> torch.device:
    """`train.device` / `--device`: auto (CUDA when this torch build sees a GPU), cpu or cuda."""
    if pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but this torch build sees no CUDA GPU: use train.device=auto or cpu")
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return torch.device("cpu")


def cpu_features() -> set[str]:
    """This CPU's instruction-set features, lower case: torch's own probe (cpuinfo), else /proc/cpuinfo's flags."""
    probe = getattr(torch.cpu, "get_capabilities", None)
    if probe is not None:
        try:
            return {k for k, v in probe().items() if v is True}
        except Exception:  # an unusual CPU: fall back to the kernel's list
            pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16(features: set[str] | None = None) -> bool:
    return bool(set(CPU_BF16_FEATURES) & (cpu_features() if features is None else features))


def resolve_precision(precision: str, device: torch.device, cuda_bf16: bool | None = None,
                      cpu_features_: set[str] | None = None) -> tuple[str, str]:
    """(the precision to train in, why): `auto` becomes bf16 on GPUs with bf16 (Ampere and newer), fp16 on GPUs
    without it (T4, V100), bf16 on CPUs with native bf16 matmul (AMX or avx512-bf16), fp32 on other CPUs. An
    explicit precision is kept. The probes can be passed in (tests)."""
    if precision != "auto":
        return precision, "set in the config"
    if device.type == "cuda":
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "this GPU"
        if cuda_bf16:
            return "bf16", f"{name} supports bf16"
        return "fp16", f"{name} has no bf16: fp16 with dynamic loss scaling"
    features = cpu_features() if cpu_features_ is None else cpu_features_
    found = [f for f in CPU_BF16_FEATURES if f in features]
    if found:
        return "bf16", f"this CPU multiplies bf16 natively ({'/'.join(found)})"
    return "fp32", "this CPU has no native bf16 matmul (no AMX or avx512-bf16): bf16 would be emulated and slower"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo) and its native bf16 features, for measured figures to say where they
    came from (machines of one model name differ in them)."""
    import platform

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    found = [f for f in CPU_BF16_FEATURES if f in cpu_features()]
    return f"{name} ({'/'.join(found) if found else 'no native bf16'})"
