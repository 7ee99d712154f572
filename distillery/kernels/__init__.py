"""Fused LoRA ops: one function per op, a Triton kernel and a torch reference with the same
semantics.

Dispatch: Triton on CUDA, the torch reference elsewhere; DISTILLERY_LORA_BACKEND=triton|torch
forces one (triton on CPU needs TRITON_INTERPRET=1 set before triton is imported).
"""

from __future__ import annotations

import os

from distillery.kernels.lora import (
    add_to_rows,
    check_lora_args,
    copy_to_rows,
    gather_rows,
    lora_apply,
    lora_conv2d_reference,
    lora_linear_reference,
    over_channels,
    segments_of,
)
from distillery.kernels.lora_meta import LoRAWeights, RowMapping, Workspace


def backend(device) -> str:
    forced = os.environ.get("DISTILLERY_LORA_BACKEND", "auto")
    if forced in ("triton", "torch"):
        return forced
    return "triton" if device.type == "cuda" else "torch"


def lora_linear(x, weight, bias, lora: LoRAWeights, mapping: RowMapping):
    """y = x W0^T + bias + per-row s (x A^T) B^T (semantics and shapes in distillery/kernels/lora.py).

    `lora` (once per layer per adapter composition) and `mapping` (once per UNet call) carry everything
    either path reads besides x and W0, so a layer call makes no host copy, no sync and (Triton) no
    allocation beyond y. Arguments are not checked here: the registry checked them at load.
    """
    if backend(x.device) == "triton":
        from distillery.kernels.lora_triton import lora_linear_fused  # imports triton: only when it is used

        return lora_linear_fused(x, weight, bias, lora, mapping)
    return lora_apply(x, weight, bias, lora.lora_a, lora.lora_b, lora.scale_floats, mapping.segments, lora.ranks)


__all__ = ["LoRAWeights", "RowMapping", "Workspace", "add_to_rows", "backend", "check_lora_args", "copy_to_rows",
           "gather_rows", "lora_apply", "lora_conv2d_reference", "lora_linear", "lora_linear_reference",
           "over_channels", "segments_of"]
