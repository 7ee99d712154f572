"""The eager serving layers of the one base UNet (the per-row and merged backends'): rows of one UNet
call may use different adapters.

Every nn.Linear and nn.Conv2d is wrapped once (the wrapper holds the SAME base module: W0 is
never copied) and runs the stock batched ops (throughput mode). The layers do what the running
call's `CallPlan` says (backends/per_row.py and backends/merged.py make it): Linear and 1 x 1
convolutions (linear over channels) take their LoRA through `kernels.lora_linear` with the layer's
composed `LoRAWeights` and the call's `RowMapping` (both built once, not per layer call); k x k
convolutions through the torch reference `kernels.lora_conv2d_reference`; or they run on merged weights.
`time_embedding.cond_proj` becomes a per-row w projection: rows whose set holds a
guidance-distilled adapter get its projection, other rows get exactly zero (their timestep
embedding is bit-identical to the plain UNet's).
Installing them is the explicit step `AdapterRegistry(model)` takes; a model nobody serves
adapters on is never wrapped.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from distillery.kernels import (
    LoRAWeights,
    RowMapping,
    add_to_rows,
    copy_to_rows,
    gather_rows,
    lora_conv2d_reference,
    lora_linear,
    over_channels,
)


@dataclass
class CallPlan:
    """What one UNet call's rows use: each distinct adapter set of the call gets a set index (in order of first
    appearance; -1 = base only). Built once per row pattern by a backend, cached there."""

    mapping: RowMapping  # each row's set index as segments, run tables, and the Triton workspace
    layers: dict[str, LoRAWeights] = field(default_factory=dict)  # A (S, R, ...), B (S, N, R), scales, ranks
    projections: list[torch.Tensor | None] = field(default_factory=list)  # per set index: (C, E) or None
    merged: dict[str, torch.Tensor] | None = None  # every row uses one set: its W0 + sum s B A, per layer it touches
    # several sets, merged backend: each set's merged weights; Linear layers run each set's rows on them
    # (a GEMM per set, no LoRA FLOPs), convolutions take per-row LoRA from `layers`
    set_merged: list[dict[str, torch.Tensor]] | None = None
    segments_with_base: list = field(default_factory=list)  # segments_of(set_of_row, with_base=True) with set_merged

    @property
    def segments(self) -> list:  # kernels.segments_of(set_of_row), computed once per call on the host
        return self.mapping.segments


class LoRAContext:
    """The plan of the call running through the UNet; given to the layers at install, set around each call."""

    def __init__(self):
        self.current: CallPlan | None = None

    @contextmanager
    def running(self, plan: CallPlan | None):
        self.current = plan
        try:
            yield
        finally:
            self.current = None


class _ServingLayer(nn.Module):
    """Holds the base module (same parameters) and routes each call: base, per-row LoRA or merged."""

    def __init__(self, base: nn.Module, name: str, context: LoRAContext):
        super().__init__()
        self.base, self.name, self.context = base, name, context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.context.current
        if plan is None:
            return self.base_forward(x, self.base.weight)
        if plan.merged is not None:
            return self.base_forward(x, plan.merged.get(self.name, self.base.weight))
        lora = plan.layers.get(self.name)
        return self.base_forward(x, self.base.weight) if lora is None else self.lora_forward(x, lora, plan)

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def lora_forward(self, x: torch.Tensor, lora: LoRAWeights, plan: CallPlan) -> torch.Tensor:
        raise NotImplementedError


class LinearShape:
    """Code that reads a Linear's shape keeps working on a wrapper holding it as `base`."""

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features


class ServingLinear(LinearShape, _ServingLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.context.current
        if plan is None or plan.set_merged is None:
            return super().forward(x)
        runs = _weight_runs(plan, self.name, self.base.weight)
        if len(runs) == 1:
            return self.base_forward(x, runs[0][1])
        # each run of rows through its weights, written in place: one GEMM per run, no LoRA FLOPs, no copies
        k, n, bias = x.shape[-1], self.base.out_features, self.base.bias
        x2 = x.reshape(-1, k)  # (rows * T, K): token rows
        y = x.new_empty(*x.shape[:-1], n)
        y2, per_row = y.view(-1, n), x2.shape[0] // x.shape[0]
        for rows, weight in runs:
            if isinstance(rows, slice):
                part = slice(rows.start * per_row, rows.stop * per_row)
                if bias is None:
                    torch.mm(x2[part], weight.t(), out=y2[part])
                else:
                    torch.addmm(bias, x2[part], weight.t(), out=y2[part])
            else:
                copy_to_rows(y, rows, self.base_forward(gather_rows(x, rows), weight))
        return y

    def base_forward(self, x, weight):
        return F.linear(x, weight, self.base.bias)

    def lora_forward(self, x, lora, plan):
        return lora_linear(x, self.base.weight, self.base.bias, lora, plan.mapping)


def _weight_runs(plan: CallPlan, name: str,
                 base_weight: torch.Tensor) -> list[tuple[slice | torch.Tensor | None, torch.Tensor]]:
    """(rows, weight) for a Linear layer in a call of several sets on merged weights: adjacent segments that
    use the same weight (base rows, sets that leave this layer alone) joined into one run."""
    runs: list[list] = []
    for s, rows in plan.segments_with_base:
        weight = base_weight if s < 0 else plan.set_merged[s].get(name, base_weight)
        if runs and runs[-1][1] is weight and isinstance(rows, slice) and isinstance(runs[-1][0], slice) \
                and runs[-1][0].stop == rows.start:
            runs[-1][0] = slice(runs[-1][0].start, rows.stop)
        else:
            runs.append([rows, weight])
    if len(runs) == 1:
        return [(None, runs[0][1])]
    return [(rows, weight) for rows, weight in runs]


class ServingConv2d(_ServingLayer):
    """1 x 1 convolutions are linear over channels ((n, C, H, W) -> (n, H W, C) token rows) and take
    the LoRA op like a Linear; k x k ones take their LoRA through the torch reference."""

    def __init__(self, base: nn.Conv2d, name: str, context: LoRAContext):
        super().__init__(base, name, context)
        self.pointwise = base.kernel_size == (1, 1) and base.stride == (1, 1) and base.dilation == (1, 1) \
            and base.groups == 1 and base.padding in ((0, 0), "valid")

    def base_forward(self, x, weight):
        return self.base._conv_forward(x, weight, self.base.bias)

    def lora_forward(self, x, lora, plan):
        conv = self.base
        if self.pointwise:
            weight = conv.weight.flatten(1)  # (N, C): a view
            return over_channels(x, lambda tokens: lora_linear(tokens, weight, conv.bias, lora, plan.mapping))
        return lora_conv2d_reference(x, conv.weight, conv.bias, lora.lora_a, lora.lora_b, lora.scale_floats,
                                     plan.segments, lora.ranks, conv.stride, conv.padding, conv.dilation, check=False)


class PerRowProjection(nn.Module):
    """time_embedding.cond_proj with a w projection per row's set (zero for sets without one)."""

    def __init__(self, out_features: int, context: LoRAContext):
        super().__init__()
        self.out_features, self.context = out_features, context

    def forward(self, emb: torch.Tensor) -> torch.Tensor:  # emb (rows, E) -> (rows, C)
        out = emb.new_zeros(emb.shape[0], self.out_features)
        plan = self.context.current
        if plan is None:
            return out
        for s, rows in plan.segments:
            if (proj := plan.projections[s]) is not None:
                add_to_rows(out, rows, F.linear(gather_rows(emb, rows), proj))  # 0 + p: exact
        return out


def has_serving_layers(unet) -> bool:
    return isinstance(unet.time_embedding.cond_proj, PerRowProjection)


def install_serving_layers(unet) -> LoRAContext:
    """Wrap every Linear and (zero-padded, ungrouped) Conv2d once, and make cond_proj per-row; returns the
    context the layers read (every eager backend on this UNet shares it). One install per UNet: a second
    registry on the same UNet would silently steer the first one's layers."""
    if has_serving_layers(unet):
        raise RuntimeError("this UNet already has serving layers (another AdapterRegistry serves it); "
                           "load another copy of the model for a second registry")
    context = LoRAContext()
    unet.time_embedding.cond_proj = PerRowProjection(unet.time_embedding.linear_1.in_features, context)
    for name in servable_layers(unet):
        module = unet.get_submodule(name)
        wrapper = ServingLinear if type(module) is nn.Linear else ServingConv2d
        unet.set_submodule(name, wrapper(module, name, context))
    return context


def servable_layers(unet) -> list[str]:
    """The layers LoRA is served on: every Linear and zero-padded ungrouped Conv2d."""
    return [name for name, module in unet.named_modules() if type(module) is nn.Linear or (
        type(module) is nn.Conv2d and module.padding_mode == "zeros" and module.groups == 1)]
