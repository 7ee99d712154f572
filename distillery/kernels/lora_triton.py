"""Per-row LoRA linear as ONE Triton kernel: base GEMM, LoRA shrink and LoRA expand fused.

Same semantics and signature as `distillery.kernels.lora.lora_linear_reference` (see there). Design
(after punica's SGMV and vLLM's lora/ops, adapted to a UNet call whose rows belong to a few
requests):
  - grid over (row blocks, output-column blocks), the usual tiled GEMM (Triton tutorial 03);
  - the shrink t = x A[slot]^T is accumulated in the SAME K loop as the base GEMM, reusing the
    x tile already loaded: no second pass over x and no (M, R) tensor in global memory. Rows
    of one block may use different slots, so each slot present contributes with a row mask
    (the masks are disjoint: one accumulator t holds every row's own shrink);
  - the expand acc += s * t B[slot]^T runs once, in the epilogue, again slot-masked.
The shrink is recomputed by every column block of a row block: R is tiny next to the block's
N columns, so that costs R / BLOCK_N of the base FLOPs, and it buys a single launch with no
intermediate. fp32 accumulation; fp16/bf16 inputs on GPU (fp32 and fp16 in the interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distillery.kernels.lora import check_lora_args


@triton.jit
def _lora_linear_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, scale_ptr, slot_ptr, y_ptr,
    M, N, K, S,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_as, stride_ar, stride_ak, stride_bs, stride_bn, stride_br,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, R: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, R)
    slot = tl.load(slot_ptr + rm, mask=rm < M, other=-1)  # (BM,)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0).to(tl.float32)  # (BM, BK)
        w_tile = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                         mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0).to(tl.float32)  # (BK, BN)
        acc += tl.dot(x, w_tile, input_precision=PRECISION)
        for s in range(0, S):  # shrink, slot by slot, on the x tile already in registers
            a = tl.load(a_ptr + s * stride_as + rr[None, :] * stride_ar + kk[:, None] * stride_ak,
                        mask=kk[:, None] < K, other=0.0).to(tl.float32)  # (BK, R)
            t += tl.dot(tl.where((slot == s)[:, None], x, 0.0), a, input_precision=PRECISION)

    for s in range(0, S):  # expand: acc += scale_s * t B_s^T for this slot's rows
        b = tl.load(b_ptr + s * stride_bs + rr[:, None] * stride_br + rn[None, :] * stride_bn,
                    mask=rn[None, :] < N, other=0.0).to(tl.float32)  # (R, BN)
        scale = tl.load(scale_ptr + s).to(tl.float32)
        acc += tl.dot(tl.where((slot == s)[:, None], t, 0.0), b, input_precision=PRECISION) * scale

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def lora_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                       lora_b: torch.Tensor, scales: torch.Tensor, row_adapter: torch.Tensor,
                       block_m: int = 32, block_n: int = 32, block_k: int = 32) -> torch.Tensor:
    check_lora_args(x, weight, bias, lora_a, lora_b, scales, row_adapter)
    lead, k = x.shape[:-1], x.shape[-1]
    rows = row_adapter.repeat_interleave(x[0].numel() // k if x.dim() == 3 else 1)  # a slot per token row
    x2 = x.reshape(-1, k)
    m, n, s = x2.shape[0], weight.shape[0], lora_a.shape[0]
    r = max(16, triton.next_power_of_2(lora_a.shape[1]))  # tl.dot needs >= 16; zero padding adds nothing
    if r != lora_a.shape[1]:
        lora_a = torch.nn.functional.pad(lora_a, (0, 0, 0, r - lora_a.shape[1]))
        lora_b = torch.nn.functional.pad(lora_b, (0, r - lora_b.shape[2]))
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _lora_linear_kernel[grid](
        x2, weight, bias if bias is not None else weight, lora_a, lora_b, scales.to(x.device, torch.float32),
        rows.to(torch.int32), y, m, n, k, s,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        y.stride(0), y.stride(1),
        # fp32 inputs get fp32 products (torch's default for fp32 matmul; TF32 missed 1e-4 on an H100)
        HAS_BIAS=bias is not None, R=r, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y.view(*lead, n)
