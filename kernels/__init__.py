"""Fused LoRA ops. Not Hugging Face's PyPI `kernels` package: tests/kernels/test_naming.py checks
that transformers and diffusers never take this package for theirs."""

from kernels.lora import check_lora_args, lora_apply, lora_linear_reference, segments_of


def lora_linear(x, weight, bias, lora_a, lora_b, scales, row_adapter, segments=None):
    """The per-row LoRA linear (semantics in kernels/lora.py). CPU: the torch reference."""
    return lora_linear_reference(x, weight, bias, lora_a, lora_b, scales, row_adapter, segments)


__all__ = ["check_lora_args", "lora_apply", "lora_linear", "lora_linear_reference", "segments_of"]
