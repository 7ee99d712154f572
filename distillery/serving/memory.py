"""Device memory figures: the CUDA allocator when there is a GPU, else the process RSS (labelled so)."""

from __future__ import annotations

import os

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")
_served_peak = 0  # CUDA: the largest step peak so far (step_peak resets the allocator's own after reading it)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def device_memory() -> dict[str, float]:
    """allocated / reserved / peak bytes; on CPU all three are RSS figures."""
    if torch.cuda.is_available():
        return {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(),
                "peak": max(_served_peak, torch.cuda.max_memory_allocated())}
    rss = rss_bytes()
    return {"allocated": rss, "reserved": rss, "peak": rss}


def memory_kind() -> str:
    return "cuda_allocator" if torch.cuda.is_available() else "process_rss"


def step_peak() -> int:
    """Peak bytes since the last call: on CUDA the allocator's peak (max_memory_allocated, then reset, so each
    engine step reads its own); on CPU the RSS now (the kernel keeps no resettable peak per interval)."""
    global _served_peak
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _served_peak = max(_served_peak, peak)
        return peak
    return rss_bytes()


class MemoryTracker:
    """Peak memory of the steps one request was in flight for: the engine's `step_peak` after each step (and the
    decode that ends it). A batch shares one device, so requests stepped together report the same peak."""

    def __init__(self):
        self._peak = 0

    def sample(self, step_peak_bytes: int) -> None:
        self._peak = max(self._peak, step_peak_bytes)

    def peak(self) -> dict[str, float]:
        return {"peak_bytes": self._peak, "kind": memory_kind()}
