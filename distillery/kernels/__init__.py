"""Fused LoRA ops: one function per op, a Triton kernel and a torch reference with the same
signature.

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


def backend(device) -> str:
    forced = os.environ.get("DISTILLERY_LORA_BACKEND", "auto")
    if forced in ("triton", "torch"):
        return forced
    return "triton" if device.type == "cuda" else "torch"


def lora_linear(x, weight, bias, lora_a, lora_b, scales, row_adapter, segments=None, check=True, ranks=None):
    """y = x W0^T + bias + per-row s (x A^T) B^T (semantics and shapes in distillery/kernels/lora.py).

    `segments` (kernels.segments_of(row_adapter)) and check=False are for callers that did both once;
    `ranks`: each slot's rank within the zero-padded R (the torch path skips the padding).
    """
    if backend(x.device) == "triton":
        from distillery.kernels.lora_triton import lora_linear_triton  # imports triton: only when it is used

        return lora_linear_triton(x, weight, bias, lora_a, lora_b, scales, row_adapter)
    if check:
        check_lora_args(x, weight, bias, lora_a, lora_b, scales, row_adapter)
    return lora_apply(x, weight, bias, lora_a, lora_b, scales,
                      segments if segments is not None else segments_of(row_adapter), ranks)


__all__ = ["add_to_rows", "backend", "check_lora_args", "copy_to_rows", "gather_rows", "lora_apply", "lora_conv2d_reference",
           "lora_linear", "lora_linear_reference", "over_channels", "segments_of"]
