"""What the per-row LoRA op reads besides x and W0, built once and reused by every layer.

Two objects, after vLLM's `LoRAKernelMeta` (per forward pass) and its stacked LoRA weights:
  - `RowMapping`, once per UNet call (the per-row backends cache it with the call's `CallPlan`): each
    row's set index, as the torch path's segments and as the Triton kernels' run tables (one small
    host-to-device copy, when the call's row pattern is first seen), plus the shrink's workspace;
  - `LoRAWeights`, once per layer per adapter composition: the call's sets' A, B, scales as an fp32 device
    tensor AND as host floats (the torch path never syncs to read them), and, built on the Triton
    path's first use, A and B zero-padded to the power-of-two rank `tl.dot` wants.
Nothing here imports triton: the torch path and the backends use it on every device.
"""

from __future__ import annotations

from functools import cached_property
from typing import NamedTuple

import torch

from distillery.kernels.lora import segments_of

MIN_DOT_RANK = 16  # tl.dot's smallest inner dimension on GPU; zero rows/columns add nothing


class Workspace:
    """The shrink's (M, R) fp32 buffer (M token rows), grown to the largest layer seen and then reused by every layer
    (the layers run one after another on one stream, each reading it before the next overwrites it)."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self.grown = 0  # how often it was (re)allocated: tests check it stays put across layers and calls

    def take(self, m: int, r: int, device: torch.device) -> torch.Tensor:
        if self.buffer is None or self.buffer.numel() < m * r or self.buffer.device != device:
            self.buffer = torch.empty(m * r, dtype=torch.float32, device=device)
            self.grown += 1
        return self.buffer[:m * r].view(m, r)  # (M, R)


class RowMapping:
    """One UNet call's rows -> set indices, in every form the LoRA op needs (built on the host, once per call).

    Semantics: rows are grouped into runs, maximal stretches of consecutive rows with one set index (-1: base
    only). The pipeline places each adapter set's rows contiguously, so a call has about one run per set. A
    Triton block of token rows looks up the runs it overlaps (`run_of_row` of its first and last row) and
    visits only those: never every set.
    Shape: set_of_row (rows,) int64 on the device; one int32 device tensor, viewed as run_start (n_runs + 1,)
    (row where each run starts, then rows), run_set (n_runs,), run_of_row (rows,).
    """

    def __init__(self, set_of_row: list[int], device, workspace: Workspace | None = None):
        self.n_rows = len(set_of_row)
        self.segments = segments_of(set_of_row)  # the torch path's (set index, rows) pairs
        starts, sets = [], []
        for i, s in enumerate(set_of_row):
            if not sets or s != sets[-1]:
                starts.append(i)
                sets.append(s)
        self.n_runs = len(sets)
        run_of_row = [j for j in range(self.n_runs) for _ in range((starts + [self.n_rows])[j + 1] - starts[j])]
        packed = torch.tensor(starts + [self.n_rows] + sets + run_of_row + set_of_row, dtype=torch.int32,
                              device=device)  # the call's only host-to-device copy
        n = self.n_runs
        self.run_start, self.run_set = packed[:n + 1], packed[n + 1:2 * n + 1]  # (n_runs + 1,), (n_runs,)
        self.run_of_row = packed[2 * n + 1:2 * n + 1 + self.n_rows]  # (rows,)
        self.set_of_row = packed[2 * n + 1 + self.n_rows:].long()  # (rows,): a device-side cast, no copy from host
        self.workspace = workspace if workspace is not None else Workspace()

    @classmethod
    def of(cls, set_of_row, device, workspace: Workspace | None = None) -> RowMapping:
        """`set_of_row`: a list of ints (no sync) or an int64 tensor (read once here)."""
        sets = set_of_row.tolist() if isinstance(set_of_row, torch.Tensor) else [int(s) for s in set_of_row]
        return cls(sets, device, workspace)


class _Stacked(NamedTuple):
    lora_a: torch.Tensor  # (S, R, K), or (S, R, C, k, k) for a k x k conv
    lora_b: torch.Tensor  # (S, N, R)
    scales: torch.Tensor  # (S,) fp32 on the factors' device
    ranks: tuple[int, ...]  # each set's own rank within R (composed sets are zero-padded to R)


class LoRAWeights(_Stacked):
    """One layer's A, B, scales per set index of a call (unpacks as (lora_a, lora_b, scales, ranks)); made once
    per adapter composition.

    `scale_floats`: the scales as Python floats, for the torch path. `padded`: A (S, Rp, K) and B (S, N, Rp)
    contiguous with Rp = max(16, next power of two >= R), made on the Triton path's first call and kept.
    """

    @classmethod
    def of(cls, lora_a: torch.Tensor, lora_b: torch.Tensor, scales, ranks=None) -> LoRAWeights:
        floats = tuple(scales.tolist() if isinstance(scales, torch.Tensor) else (float(s) for s in scales))
        weights = cls(lora_a, lora_b, torch.tensor(floats, dtype=torch.float32, device=lora_a.device),
                      tuple(ranks) if ranks is not None else (lora_a.shape[1],) * lora_a.shape[0])
        weights.__dict__["scale_floats"] = floats  # known on the host already: no read back
        return weights

    @cached_property
    def scale_floats(self) -> tuple[float, ...]:
        return tuple(self.scales.tolist())

    @cached_property
    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.lora_a.shape[1]
        rp = max(MIN_DOT_RANK, 1 << (r - 1).bit_length())
        a = self.lora_a.reshape(self.lora_a.shape[0], r, -1)  # (S, R, K): a 1 x 1 conv's A is already (S, R, C)
        if rp == r:
            return a.contiguous(), self.lora_b.contiguous()  # views when they already are
        pad_a = a.new_zeros(a.shape[0], rp, a.shape[2])  # (S, Rp, K)
        pad_a[:, :r] = a
        pad_b = self.lora_b.new_zeros(*self.lora_b.shape[:2], rp)  # (S, N, Rp)
        pad_b[:, :, :r] = self.lora_b
        return pad_a, pad_b
