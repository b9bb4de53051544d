"""GPUs users plan for: memory as `nvidia-smi` reports it, bf16 support, dense 16-bit tensor-core peak.

Memory is the card's total as nvidia-smi shows it (MiB); the CUDA context and fragmentation are not
subtracted here, the simulation's `GPU_OVERHEAD` margin accounts for them.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20


@dataclass(frozen=True)
class GPU:
    name: str
    memory_mib: int
    bf16: bool
    peak_tflops: float  # dense fp16/bf16 tensor-core peak, vendor datasheet

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB


GPUS: dict[str, GPU] = {
    "t4": GPU("NVIDIA T4 (16 GB)", 15_360, bf16=False, peak_tflops=65),
    "a10g": GPU("NVIDIA A10G (24 GB)", 23_028, bf16=True, peak_tflops=70),
    "l4": GPU("NVIDIA L4 (24 GB)", 23_034, bf16=True, peak_tflops=121),
    "a100-40g": GPU("NVIDIA A100 40GB", 40_960, bf16=True, peak_tflops=312),
    "a100-80g": GPU("NVIDIA A100 80GB", 81_920, bf16=True, peak_tflops=312),
    "h100": GPU("NVIDIA H100 80GB (SXM)", 81_559, bf16=True, peak_tflops=989),
    "h200": GPU("NVIDIA H200 (141 GB)", 143_771, bf16=True, peak_tflops=989),
}

# Memory classes for "which cards does this fit": the smallest common card of each class.
MEMORY_CLASSES: list[tuple[str, int]] = [
    ("8 GB", 8_192),  # RTX 3070 / 4060 Ti 8 GB
    ("16 GB", GPUS["t4"].memory_mib),
    ("24 GB", GPUS["a10g"].memory_mib),
    ("40 GB", GPUS["a100-40g"].memory_mib),
    ("80 GB", GPUS["h100"].memory_mib),
]


def smallest_class(need_bytes: float) -> str | None:
    """The smallest memory class whose card holds `need_bytes` (already including the GPU margin), or None."""
    return next((name for name, mib in MEMORY_CLASSES if need_bytes <= mib * MIB), None)
