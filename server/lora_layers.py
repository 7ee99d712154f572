"""Serving-time LoRA on the one base UNet: rows of one UNet call may use different adapters.

Targeted nn.Linear layers are wrapped (the wrapper holds the SAME base Linear: W0 is never
copied) and route through `kernels.lora_linear` with the call's per-row adapter slot.
`time_embedding.cond_proj` becomes a per-row w projection: rows whose set holds a
guidance-distilled adapter get its projection, other rows get exactly zero (their timestep
embedding is bit-identical to the plain UNet's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kernels import lora_linear


@dataclass
class AdapterBatch:
    """What one UNet call's rows use: a slot per distinct adapter set, rank-concatenated."""

    row_slot: torch.Tensor  # (rows,) int64, -1 = base only
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # A, B, scales
    projections: list[torch.Tensor | None] = field(default_factory=list)  # per slot: (C, E) or None
    segments: list = field(default_factory=list)  # kernels.segments_of(row_slot), computed once per call
    merged: dict[str, torch.Tensor] | None = None  # one set covers every row: W0 + sum s B A per layer


class LoRAContext:
    """The batch currently running through the UNet; set around each call by the registry."""

    def __init__(self):
        self.current: AdapterBatch | None = None


class ServingLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, name: str, context: LoRAContext):
        super().__init__()
        self.base, self.name, self.context = base, name, context

    @property
    def in_features(self) -> int:  # code that reads a Linear's shape keeps working on the wrapper
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.context.current
        if batch is not None and batch.merged is not None:
            merged = batch.merged.get(self.name)
            return self.base(x) if merged is None else F.linear(x, merged, self.base.bias)
        entry = batch.layers.get(self.name) if batch is not None else None
        if entry is None:
            return self.base(x)
        lora_a, lora_b, scales = entry
        return lora_linear(x, self.base.weight, self.base.bias, lora_a, lora_b, scales, batch.row_slot,
                           segments=batch.segments, check=False)


class PerRowProjection(nn.Module):
    """time_embedding.cond_proj with a w projection per row's slot (zero for slots without one)."""

    def __init__(self, out_features: int, context: LoRAContext):
        super().__init__()
        self.out_features, self.context = out_features, context

    def forward(self, emb: torch.Tensor) -> torch.Tensor:  # emb (rows, E) -> (rows, C)
        out = emb.new_zeros(emb.shape[0], self.out_features)
        batch = self.context.current
        if batch is None:
            return out
        for slot, proj in enumerate(batch.projections):
            if proj is not None:
                rows = (batch.row_slot == slot).nonzero().squeeze(1)
                out.index_copy_(0, rows, emb.index_select(0, rows) @ proj.T)
        return out


def install_serving_layers(unet, layer_names: set[str], context: LoRAContext) -> None:
    """Wrap the named Linear layers (idempotent); everything else stays as it is."""
    for name in layer_names:
        module = unet.get_submodule(name)
        if isinstance(module, ServingLoRALinear):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"layer {name!r} is {type(module).__name__}; serving LoRA covers nn.Linear layers")
        unet.set_submodule(name, ServingLoRALinear(module, name, context))
    if not isinstance(unet.time_embedding.cond_proj, PerRowProjection):
        unet.time_embedding.cond_proj = PerRowProjection(unet.time_embedding.linear_1.in_features, context)
