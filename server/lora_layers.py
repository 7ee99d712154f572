"""Serving-time layers of the one base UNet: rows of one UNet call may use different adapters,
and a row's result never depends on the other rows (kernels/batch_invariant.py).

Every nn.Linear and nn.Conv2d is wrapped once (the wrapper holds the SAME base module: W0 is
never copied). Linear and 1 x 1 convolutions (linear over channels) route through
`kernels.lora_linear` with the call's per-row adapter slot; k x k convolutions are convolved
per image and take their LoRA through the torch reference `kernels.lora_conv2d_reference`.
`time_embedding.cond_proj` becomes a per-row w projection: rows whose set holds a
guidance-distilled adapter get its projection, other rows get exactly zero (their timestep
embedding is bit-identical to the plain UNet's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kernels import add_to_rows, batch_invariant, gather_rows, lora_conv2d_reference, lora_linear


@dataclass
class AdapterBatch:
    """What one UNet call's rows use: a slot per distinct adapter set, rank-concatenated."""

    row_slot: torch.Tensor  # (rows,) int64, -1 = base only
    layers: dict[str, tuple] = field(default_factory=dict)  # A (S, R, ...), B (S, N, R), scales (S,), ranks per slot
    projections: list[torch.Tensor | None] = field(default_factory=list)  # per slot: (C, E) or None
    segments: list = field(default_factory=list)  # kernels.segments_of(row_slot), computed once per call
    merged: dict[str, torch.Tensor] | None = None  # one set covers every row: W0 + sum s B A per layer


class LoRAContext:
    """The batch currently running through the UNet; set around each call by the registry."""

    def __init__(self):
        self.current: AdapterBatch | None = None


class _ServingLayer(nn.Module):
    def __init__(self, base: nn.Module, name: str, context: LoRAContext):
        super().__init__()
        self.base, self.name, self.context = base, name, context

    def weight_and_lora(self):
        """(weight, LoRA entry or None) for the current call: merged weights when a cached set covers it."""
        batch = self.context.current
        if batch is None:
            return self.base.weight, None
        if batch.merged is not None:
            return batch.merged.get(self.name, self.base.weight), None
        return self.base.weight, batch.layers.get(self.name)


class ServingLinear(_ServingLayer):
    @property
    def in_features(self) -> int:  # code that reads a Linear's shape keeps working on the wrapper
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, lora = self.weight_and_lora()
        if lora is None:
            return batch_invariant.linear(x, weight, self.base.bias)
        batch = self.context.current
        lora_a, lora_b, scales, ranks = lora
        return lora_linear(x, weight, self.base.bias, lora_a, lora_b, scales, batch.row_slot, segments=batch.segments,
                           check=False, ranks=ranks)


class ServingConv2d(_ServingLayer):
    def __init__(self, base: nn.Conv2d, name: str, context: LoRAContext):
        super().__init__(base, name, context)
        self.pointwise = base.kernel_size == (1, 1) and base.stride == (1, 1) and base.dilation == (1, 1) \
            and base.groups == 1 and base.padding in ((0, 0), "valid")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, lora = self.weight_and_lora()
        batch, conv = self.context.current, self.base
        if self.pointwise:  # linear over channels: (n, C, H, W) -> (n, H W, C) tokens
            n, c, h, w = x.shape
            tokens = x.permute(0, 2, 3, 1).reshape(n, h * w, c)
            weight = weight.view(weight.shape[0], c)
            if lora is None:
                y = batch_invariant.linear(tokens, weight, conv.bias)
            else:
                lora_a, lora_b, scales, ranks = lora
                y = lora_linear(tokens, weight, conv.bias, lora_a, lora_b, scales, batch.row_slot,
                                segments=batch.segments, check=False, ranks=ranks)
            return y.view(n, h, w, -1).permute(0, 3, 1, 2).contiguous()
        if lora is None:
            return batch_invariant.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return lora_conv2d_reference(x, weight, conv.bias, *lora[:3], batch.segments, lora[3], conv.stride,
                                     conv.padding, conv.dilation)


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
        for slot, rows in batch.segments:
            if (proj := batch.projections[slot]) is not None:
                add_to_rows(out, rows, batch_invariant.linear(gather_rows(emb, rows), proj))  # 0 + p: exact
        return out


def install_serving_layers(unet, context: LoRAContext) -> None:
    """Wrap every Linear and (zero-padded, ungrouped) Conv2d once, and make cond_proj per-row."""
    if not isinstance(unet.time_embedding.cond_proj, PerRowProjection):
        unet.time_embedding.cond_proj = PerRowProjection(unet.time_embedding.linear_1.in_features, context)
    if any(isinstance(m, _ServingLayer) for m in unet.modules()):
        return
    for name, module in list(unet.named_modules()):
        if type(module) is nn.Linear:
            unet.set_submodule(name, ServingLinear(module, name, context))
        elif type(module) is nn.Conv2d and module.padding_mode == "zeros" and module.groups == 1:
            unet.set_submodule(name, ServingConv2d(module, name, context))
