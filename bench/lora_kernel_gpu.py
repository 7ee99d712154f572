"""lora_kernel_gpu: the fused Triton kernel vs the cuBLAS base GEMM and the unfused LoRA path.

SD-1.5 attention shapes (to_q at 64x64 latent: M = batch x 4096 tokens, K = N = 320; and the
1280-wide blocks), rank 64, fp16, two adapters split across the rows. Timed with
triton.testing.do_bench. NEEDS_CUDA: without a GPU `python -m bench` skips it and records nothing.
"""

from __future__ import annotations

import torch

NEEDS_CUDA = True
SHAPES = [(2 * 4096, 320, 320), (2 * 256, 1280, 1280), (2 * 4096, 320, 2560)]  # (M, K, N)


def run(quick: bool = False) -> dict:
    if not torch.cuda.is_available():  # no figures rather than fake ones (the CPU path: lora_overhead)
        raise RuntimeError("lora_kernel_gpu needs a CUDA GPU; this machine has none")
    import triton.testing

    from distillery.kernels.lora_triton import lora_linear_triton

    figures = {}
    for m, k, n in SHAPES[:1] if quick else SHAPES:
        dev = dict(device="cuda", dtype=torch.float16)
        x, w = torch.randn(m, k, **dev), torch.randn(n, k, **dev) / k**0.5
        a, b = torch.randn(2, 64, k, **dev) / k**0.5, torch.randn(2, n, 64, **dev) / 8
        scales = torch.ones(2, device="cuda")
        rows = (torch.arange(m, device="cuda") >= m // 2).long()
        base = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, w))
        unfused = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, w) + torch.cat(
            [(x[: m // 2] @ a[0].T) @ b[0].T, (x[m // 2:] @ a[1].T) @ b[1].T]))
        fused = triton.testing.do_bench(lambda: lora_linear_triton(x, w, None, a, b, scales, rows))
        tag = f"{m}x{k}x{n}"
        figures.update({f"fused_over_base_{tag}": fused / base, f"unfused_over_base_{tag}": unfused / base})
    return figures
