"""Peak memory of the training process: CUDA allocator when on GPU, process peak RSS on CPU."""

from __future__ import annotations

import resource
import sys

import torch


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class MemoryMeter:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return peak_rss_bytes()

    def peak_mib(self) -> float:
        return round(self.peak_bytes() / 2**20, 1)

    def readings(self) -> dict[str, float]:
        """What a metrics record carries: the peak (allocated on CUDA, RSS on CPU), and on CUDA the allocator's
        peak reserved bytes (allocated + cached blocks: what nvidia-smi sees of the tensors)."""
        out = {"peak_mem_mib": self.peak_mib()}
        if self.device.type == "cuda":
            out["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved(self.device) / 2**20, 1)
        return out
