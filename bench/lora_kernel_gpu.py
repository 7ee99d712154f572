"""lora_kernel_gpu: the Triton LoRA kernels vs the cuBLAS base GEMM and the unfused LoRA path.

SD-1.5 attention shapes (to_q at 64x64 latent: M = batch x 4096 tokens, K = N = 320; and the
1280-wide blocks), rank 64, fp16, two adapters split across the rows. Timed with
triton.testing.do_bench. `fused`: the serving path (`lora_linear_fused`, per-call metadata built once,
as the registry does per UNet call); `wrapper`: `lora_linear_triton`, which rebuilds it every call.
The first call of each shape autotunes (outside the timing). NEEDS_CUDA: without a GPU `python -m bench`
skips it and records nothing.
"""

from __future__ import annotations

import torch

NEEDS_CUDA = True
SHAPES = [(2 * 4096, 320, 320), (2 * 256, 1280, 1280), (2 * 4096, 320, 2560)]  # (M, K, N)


def shape_figures(m: int, k: int, n: int, bench, device: str = "cuda", dtype=torch.float16) -> dict[str, float]:
    """Each path's time over the base GEMM's at one shape, after checking the kernel against the reference;
    `bench(fn)` -> ms (triton.testing.do_bench on a GPU)."""
    from distillery.kernels import LoRAWeights, RowMapping, lora_linear_reference
    from distillery.kernels.lora_triton import lora_linear_fused, lora_linear_triton

    rank, dev = min(64, k), {"device": device, "dtype": dtype}
    x, w = torch.randn(m, k, **dev), torch.randn(n, k, **dev) / k**0.5
    a, b = torch.randn(2, rank, k, **dev) / k**0.5, torch.randn(2, n, rank, **dev) / rank**0.5
    scales = torch.ones(2, device=device)
    rows = (torch.arange(m, device=device) >= m // 2).long()
    lora, slots = LoRAWeights.of(a, b, scales), RowMapping.of(rows, device)  # once, as per UNet call in serving
    expected = lora_linear_reference(x.float(), w.float(), None, a.float(), b.float(), scales, rows)
    torch.testing.assert_close(lora_linear_fused(x, w, None, lora, slots).float(), expected, rtol=2e-2, atol=2e-2)

    def unfused():
        return torch.nn.functional.linear(x, w) + torch.cat(
            [(x[: m // 2] @ a[0].T) @ b[0].T, (x[m // 2:] @ a[1].T) @ b[1].T])

    base = bench(lambda: torch.nn.functional.linear(x, w))
    times = {"fused": bench(lambda: lora_linear_fused(x, w, None, lora, slots)), "unfused": bench(unfused),
             "wrapper": bench(lambda: lora_linear_triton(x, w, None, a, b, scales, rows))}
    return {f"{path}_over_base_{m}x{k}x{n}": t / base for path, t in times.items()}


def run(quick: bool = False) -> dict:
    if not torch.cuda.is_available():  # no figures rather than fake ones (the CPU path: lora_overhead)
        raise RuntimeError("lora_kernel_gpu needs a CUDA GPU; this machine has none")
    import triton.testing

    figures = {}
    for m, k, n in SHAPES[:1] if quick else SHAPES:
        figures.update(shape_figures(m, k, n, triton.testing.do_bench))
    return figures
