"""Compile-friendly serving layers (the compiled backend's): every adapter in a fixed slot of preallocated buffers.

A slot is one adapter's place in a layer's buffers, the same place in every layer, kept across UNet
calls (backends/compiled.py decides which adapter holds which slot). torch.compile specialises a graph
on the Python objects a forward reads; nothing these layers read changes shape or identity between
calls (vLLM's stacked LoRA buffers; diffusers' hotswap with rank padding):
  - each wrapped layer holds A (S R, ...) and B (N, S R) for S slots of rank R (an adapter of lower rank is
    zero-padded), and `load` copies an adapter into its slot in place;
  - a call's adapter sets and weights arrive as ONE tensor, `row_coef` (rows, S R): each row's weight x scale
    on the columns of its adapters' slots, 0 elsewhere; its w projection as `proj_coef` (rows, S).
Cost: every wrapped layer computes the S R LoRA columns for every row (the all-sets form of kernels.lora);
only layers some adapter targets are wrapped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distillery.adapters.layers import LinearShape


class SlotContext:
    """The running call's coefficients: set inside the compiled function, so they are graph inputs."""

    row_coef: torch.Tensor | None = None  # (rows, S R)
    proj_coef: torch.Tensor | None = None  # (rows, S)


class SlotLayer(LinearShape, nn.Module):
    """A Linear or zero-padded Conv2d (W0 shared, never copied) plus S slots of rank-R LoRA."""

    def __init__(self, base: nn.Module, slots: int, rank: int, context: SlotContext):
        super().__init__()
        self.base, self.context, self.rank = base, context, rank
        weight = base.weight  # (N, K) or (N, C, kh, kw)
        self.register_buffer("lora_a", weight.new_zeros(slots * rank, *weight.shape[1:]))  # (S R, K | C, kh, kw)
        self.register_buffer("lora_b", weight.new_zeros(weight.shape[0], slots * rank))  # (N, S R)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coef = self.context.row_coef  # (rows, S R)
        if isinstance(self.base, nn.Linear):
            t = F.linear(x, self.lora_a)  # (rows, [tokens,] S R)
            t = t * coef.view(coef.shape[0], *([1] * (x.dim() - 2)), coef.shape[1])
            return self.base(x) + F.linear(t, self.lora_b)
        conv = self.base
        t = F.conv2d(x, self.lora_a, None, conv.stride, conv.padding, conv.dilation)  # (rows, S R, H', W')
        return conv(x) + F.conv2d(t * coef[:, :, None, None], self.lora_b[:, :, None, None])

    @torch.no_grad()
    def load(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """A (r, ...) and B (N, r) into `slot`, zero-padded to the slot's rank; in place."""
        r, cols = a.shape[0], slice(slot * self.rank, (slot + 1) * self.rank)
        self.lora_a[cols].zero_()[:r].copy_(a.view(r, *self.lora_a.shape[1:]))
        self.lora_b[:, cols].zero_()[:, :r].copy_(b)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        cols = slice(slot * self.rank, (slot + 1) * self.rank)
        self.lora_a[cols].zero_()
        self.lora_b[:, cols].zero_()


class SlotProjection(nn.Module):
    """time_embedding.cond_proj per row: the w projection of the row's distilled adapter's slot, else zero."""

    def __init__(self, out_features: int, in_features: int, slots: int, context: SlotContext, like: torch.Tensor):
        super().__init__()
        self.context = context
        self.register_buffer("weight", like.new_zeros(slots, out_features, in_features))  # (S, C, E)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:  # emb (rows, E) -> (rows, C)
        return torch.einsum("re,sce,rs->rc", emb, self.weight, self.context.proj_coef)
