"""Per-row LoRA linear in Triton, punica's SGMV split: a shrink kernel, then the base GEMM fused with the expand.

Semantics: as `distillery.kernels.lora.lora_linear_reference`:
    y[m] = x[m] W0^T + bias + s[j] (x[m] A[j]^T) B[j]^T,  j = the set index of token row m's row (-1: base only).
Shape: x (rows, K) or (rows, T, K) (T token rows per row, all with the row's set); W0 (N, K); A (S, R, K);
    B (S, N, R); y like x with N for K.

Design (punica / vLLM `lora/ops/triton_ops`, for a UNet call whose rows belong to a few requests):
  - shrink: t = x A[j]^T, (M, Rp) fp32 into the workspace `RowMapping` carries, computed ONCE per block
    of token rows. The previous single kernel recomputed it in every column block (~2x base FLOPs at rank 64,
    N = 320). One kernel computing it once would need a block of token rows to own all N columns (a tile too
    large at N = 2560) or a dependency between column blocks; the split costs a second launch and one
    (M, Rp) fp32 round trip (2 x 2 MB at M = 8192, Rp = 64, next to the 10.7 MB the base GEMM moves,
    L2-resident on an H100). It is what punica and vLLM do; nothing was timed (no GPU here);
  - expand: the base GEMM's tiles (tutorial 03, grouped ordering) and, in the epilogue, acc += (s t) B^T
    for the runs of rows in the block: one tl.dot per set present into the same accumulator, s t rounded
    to x's dtype first (the reference rounds x A^T too), no (M, N) delta in memory;
  - only the sets present: a block reads the runs (maximal stretches of rows with one set index) it
    overlaps from `RowMapping`'s tables, built once per UNet call on the host; it never scans every set;
  - fp16/bf16 operands go into tl.dot as they are (tensor-core rate), fp32 accumulation; fp32 operands
    take "ieee" products (the reference's fp32 matmul; TF32 missed 1e-4 on an H100);
  - tiles: @triton.autotune over a few configs for SD-1.5's shapes on CUDA, keyed on (M bucket, N, K, R)
    (M is bucketed to a power of two: every latent size x batch would otherwise re-tune); under
    TRITON_INTERPRET (CPU) ONE small config, since choosing among several needs a GPU to time them;
  - no split-K in the shrink (vLLM has it for decode's few tokens): SD's attention and conv layers have
    M = rows x tokens, thousands; those with M = rows (timestep projections) are tiny anyway.
Per call, only y is allocated: the run tables, scales, padded A/B and the workspace are made once
(per UNet call, per composition) and reused by every layer.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from distillery.kernels.lora import check_lora_args
from distillery.kernels.lora_meta import LoRAWeights, RowMapping

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read when triton is imported, as triton does


def _configs(names, tiles):
    """triton.Configs from (tile sizes..., num_warps, num_stages) tuples."""
    return [triton.Config(dict(zip(names, t[:-2])), num_warps=t[-2], num_stages=t[-1]) for t in tiles]


EXPAND_TILES, SHRINK_TILES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), ("BLOCK_M", "BLOCK_K")
if INTERPRETED:  # ONE config: autotuning among several needs a GPU to time them
    EXPAND_CONFIGS = _configs(EXPAND_TILES, [(16, 32, 32, 2, 4, 1)])
    SHRINK_CONFIGS = _configs(SHRINK_TILES, [(16, 32, 4, 1)])
else:  # SD-1.5: K, N in {320, 640, 1280, 2560} (BN 64 divides 320), M from 2 x 64 to 8 x 2 x 4096, R <= 128
    EXPAND_CONFIGS = _configs(EXPAND_TILES, [(128, 128, 64, 8, 8, 3), (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4),
                                             (128, 256, 64, 8, 8, 3), (64, 64, 64, 8, 4, 4), (64, 64, 32, 8, 4, 5)])
    SHRINK_CONFIGS = _configs(SHRINK_TILES, [(64, 64, 4, 4), (128, 64, 4, 3), (64, 128, 4, 3), (32, 128, 4, 4)])


@triton.jit
def _runs_of_block(m0, M, T, run_of_row_ptr, BLOCK_M: tl.constexpr):
    """The first and last run a block of token rows [m0, m0 + BLOCK_M) overlaps (token row m is row m // T)."""
    first = tl.load(run_of_row_ptr + m0 // T)
    last = tl.load(run_of_row_ptr + (tl.minimum(m0 + BLOCK_M, M) - 1) // T)
    return first, last


@triton.autotune(configs=SHRINK_CONFIGS, key=["M_BUCKET", "K", "R"])
@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, t_ptr, run_start_ptr, run_set_ptr, run_of_row_ptr,
    M, K, T, M_BUCKET,
    stride_xm, stride_xk, stride_as, stride_ar, stride_ak, stride_tm,
    R: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """t[m] = x[m] A[j]^T for the token rows of LoRA runs in this block (base rows are not written)."""
    m0 = tl.program_id(0) * BLOCK_M
    rm = m0 + tl.arange(0, BLOCK_M)
    rm_load = tl.minimum(rm, M - 1)  # clamped token rows: unmasked loads, the store masks them
    rr = tl.arange(0, R)
    rk = tl.arange(0, BLOCK_K)
    first, last = _runs_of_block(m0, M, T, run_of_row_ptr, BLOCK_M)
    for i in range(first, last + 1):
        j = tl.load(run_set_ptr + i)
        if j >= 0:
            lo = tl.load(run_start_ptr + i) * T
            hi = tl.load(run_start_ptr + i + 1) * T
            t = tl.zeros((BLOCK_M, R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + rk
                x = tl.load(x_ptr + rm_load[:, None] * stride_xm + kk[None, :] * stride_xk,
                            mask=kk[None, :] < K, other=0.0)  # (BM, BK) in x's dtype
                a = tl.load(a_ptr + j * stride_as + rr[None, :] * stride_ar + kk[:, None] * stride_ak,
                            mask=kk[:, None] < K, other=0.0)  # (BK, R)
                t = tl.dot(x, a, t, input_precision=PRECISION)
            in_run = (rm >= lo) & (rm < hi) & (rm < M)
            tl.store(t_ptr + rm[:, None] * stride_tm + rr[None, :], t, mask=in_run[:, None])


@triton.autotune(configs=EXPAND_CONFIGS, key=["M_BUCKET", "N", "K", "R"])
@triton.jit
def _expand_kernel(
    x_ptr, w_ptr, bias_ptr, t_ptr, b_ptr, scale_ptr, y_ptr, run_start_ptr, run_set_ptr, run_of_row_ptr,
    M, N, K, T, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_tm, stride_bs, stride_bn, stride_br, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, R: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y = x W0^T + bias + s[j] t B[j]^T over one (BM, BN) tile; only the runs in the block visited."""
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * grid_n)  # grouped ordering: GROUP_M blocks of token rows share W0's column tiles in L2
    group_size = tl.minimum(grid_m - group * GROUP_M, GROUP_M)
    pid_m = group * GROUP_M + (pid % (GROUP_M * grid_n)) % group_size
    pid_n = (pid % (GROUP_M * grid_n)) // group_size
    m0 = pid_m * BLOCK_M
    rm = m0 + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_load, rn_load = tl.minimum(rm, M - 1), tl.minimum(rn, N - 1)  # clamped: unmasked loads, masked store
    rk = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm_load[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=kk[None, :] < K, other=0.0)  # (BM, BK) in x's dtype
        w = tl.load(w_ptr + rn_load[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=kk[:, None] < K, other=0.0)  # (BK, BN)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)

    rr = tl.arange(0, R)
    first, last = _runs_of_block(m0, M, T, run_of_row_ptr, BLOCK_M)
    for i in range(first, last + 1):
        j = tl.load(run_set_ptr + i)
        if j >= 0:
            lo = tl.load(run_start_ptr + i) * T
            hi = tl.load(run_start_ptr + i + 1) * T
            in_run = (rm >= lo) & (rm < hi) & (rm < M)
            t = tl.load(t_ptr + rm[:, None] * stride_tm + rr[None, :], mask=in_run[:, None], other=0.0)  # (BM, R) fp32
            t = (t * tl.load(scale_ptr + j)).to(y_ptr.dtype.element_ty)  # token rows outside the run: 0
            b = tl.load(b_ptr + j * stride_bs + rr[:, None] * stride_br + rn_load[None, :] * stride_bn)  # (R, BN)
            acc = tl.dot(t, b, acc, input_precision=PRECISION)  # into acc: no second (BM, BN) block in registers

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_load).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: "ieee" for fp32 operands (fp32 products, as the reference); fp16/bf16
    operands go to the tensor cores as they are ("tf32" is tl.dot's default and means nothing for them)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def lora_linear_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora: LoRAWeights,
                      mapping: RowMapping) -> torch.Tensor:
    """The serving path: two launches, y the only allocation. `lora` and `mapping` were checked and built once
    (per composition, per UNet call); only the row count is checked here (cheap, and a wrong one would
    read out of bounds)."""
    if x.shape[0] != mapping.n_rows:
        raise ValueError(f"x {tuple(x.shape)} has {x.shape[0]} rows but the call's RowMapping has {mapping.n_rows}")
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)  # (M, K) token rows; a view for contiguous x
    m = x2.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)  # (M, N)
    if m == 0:
        return y.view(*x.shape[:-1], n)
    per_row = m // mapping.n_rows  # T: token rows per row
    lora_a, lora_b = lora.padded  # (S, Rp, K), (S, N, Rp)
    r = lora_a.shape[1]
    t = mapping.workspace.take(m, r, x.device)  # (M, Rp) fp32
    bucket = triton.next_power_of_2(m)
    precision = dot_precision(x.dtype)
    tables = (mapping.run_start, mapping.run_set, mapping.run_of_row)
    _shrink_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](
        x2, lora_a, t, *tables, m, k, per_row, bucket,
        x2.stride(0), x2.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), t.stride(0),
        R=r, PRECISION=precision)
    _expand_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
        x2, weight, bias if bias is not None else weight, t, lora_b, lora.scales, y, *tables, m, n, k, per_row, bucket,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), t.stride(0),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, R=r, PRECISION=precision)
    return y.view(*x.shape[:-1], n)


def lora_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                       lora_b: torch.Tensor, scales: torch.Tensor, set_of_row: torch.Tensor) -> torch.Tensor:
    """`lora_linear_reference`'s signature, for tests and benchmarks: checks the arguments and builds the
    per-call metadata itself (a read of set_of_row, a host-to-device copy, padding). Serving builds those
    once per UNet call / composition and calls `lora_linear_fused`."""
    check_lora_args(x, weight, bias, lora_a, lora_b, scales, set_of_row)
    return lora_linear_fused(x, weight, bias, LoRAWeights.of(lora_a, lora_b, scales.to(x.device)),
                             RowMapping.of(set_of_row, x.device))
