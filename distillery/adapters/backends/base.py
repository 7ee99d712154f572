"""The LoRA backend interface: what one UNet call needs, its rows each with their own adapter set.

Three implementations, one per way of running LoRA over the one frozen base UNet: per_row.py (LoRA
kernels per row), merged.py (W0 + BA weights per set) and compiled.py (adapters copied into the fixed
slots of a torch.compile'd UNet). backends/__init__.py lists those a model can run and holds the one
rule choosing among them; `pipeline._unet_call` asks the registry's choice and never which one it is.
"""

from __future__ import annotations

from typing import Protocol

import torch

from distillery.adapters.loaded import AdapterSet
from distillery.model import Conditioning


class LoRABackend(Protocol):
    name: str  # "per_row", "merged" or "compiled": what settings, benchmarks and logs call it

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, w_emb: torch.Tensor,
            row_sets: list[AdapterSet]) -> torch.Tensor:
        """The UNet's output (rows, C, h, w) for x (rows, C, h, w), t (rows,), `cond` (rows) and the w
        embedding w_emb (rows, E), row i with the adapters of `row_sets[i]` (() = the base alone). W0 and the
        adapters are left as they were. On the torch thread."""
        ...

    def forget(self) -> None:
        """Drop what is cached about adapters (one left the registry, or a setting changed). Any thread: a
        backend may drop it at its next call, on the torch thread."""
        ...
