"""Device memory figures: the CUDA allocator when there is a GPU, else the process RSS (labelled so)."""

from __future__ import annotations

import os

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def device_memory() -> dict[str, float]:
    """allocated / reserved / peak bytes; on CPU all three are RSS figures."""
    if torch.cuda.is_available():
        return {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(),
                "peak": torch.cuda.max_memory_allocated()}
    rss = rss_bytes()
    return {"allocated": rss, "reserved": rss, "peak": rss}


def memory_kind() -> str:
    return "cuda_allocator" if torch.cuda.is_available() else "process_rss"


class MemoryTracker:
    """Peak memory seen during one request, sampled after each of its UNet steps."""

    def __init__(self):
        self._peak = 0

    def sample(self) -> None:
        current = torch.cuda.memory_allocated() if torch.cuda.is_available() else rss_bytes()
        self._peak = max(self._peak, current)

    def peak(self) -> dict[str, float]:
        return {"peak_bytes": self._peak, "kind": memory_kind()}
