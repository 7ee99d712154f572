"""The Triton kernels against the torch reference: dtype x rank x M x N x adapter sets (interpreter on CPU)."""

import pytest
import torch

from distillery.kernels import LoRAWeights, RowMapping, lora_linear_reference
from distillery.kernels.lora_triton import (
    EXPAND_CONFIGS,
    INTERPRETED,
    dot_precision,
    lora_linear_fused,
    lora_linear_triton,
)

# fp32 operands take "ieee" products (asserted below), so fp32's bound is the reference's own rounding; were
# they TF32 (10-bit mantissa) the bound would have to be ~1e-3 relative
TOLERANCE = {torch.float32: {"rtol": 1e-4, "atol": 1e-4} if dot_precision(torch.float32) == "ieee"
             else {"rtol": 2e-3, "atol": 2e-3},
             torch.float16: {"rtol": 2e-2, "atol": 2e-2}, torch.bfloat16: {"rtol": 5e-2, "atol": 5e-2}}
DTYPES = [torch.float32, torch.float16,  # bf16: GPU only, a visible skip elsewhere (not a silently missing case)
          pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="bfloat16 Triton kernel: needs a CUDA GPU"))]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_M = EXPAND_CONFIGS[0].kwargs["BLOCK_M"]  # the interpreter's one config (a GPU autotunes among several)


def _case(m, k, n, sets, ranks, dtype, tokens=None, seed=0, set_of_row=None):
    g = torch.Generator().manual_seed(seed)
    r = max(ranks)
    a = torch.zeros(sets, r, k)
    b = torch.zeros(sets, n, r)
    for s in range(sets):  # ragged: set s uses ranks[s % len] of the padded r (composed sets look like this)
        rs = ranks[s % len(ranks)]
        a[s, :rs] = torch.randn(rs, k, generator=g) / k**0.5
        b[s, :, :rs] = torch.randn(n, rs, generator=g) / rs**0.5
    x = torch.randn((m, tokens, k) if tokens else (m, k), generator=g)
    weight = torch.randn(n, k, generator=g) / k**0.5
    bias = torch.randn(n, generator=g)
    set_of_row = torch.randint(-1, sets, (m,), generator=g) if set_of_row is None else torch.tensor(set_of_row)
    scales = torch.rand(sets, generator=g) + 0.5
    to = {"device": DEVICE, "dtype": dtype}
    return x.to(**to), weight.to(**to), bias.to(**to), a.to(**to), b.to(**to), scales.to(DEVICE), set_of_row.to(DEVICE)


def _check(args, dtype=torch.float32):
    expected = lora_linear_reference(*[t.float() if t is not None and t.is_floating_point() else t for t in args])
    torch.testing.assert_close(lora_linear_triton(*args).float(), expected, **TOLERANCE[dtype])


def test_fp32_operands_take_ieee_products():
    assert dot_precision(torch.float32) == "ieee"  # TOLERANCE[fp32] rests on this


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ranks", [(4,), (16,), (4, 12), (64,)], ids=["r4", "r16", "ragged", "r64"])
@pytest.mark.parametrize("m, k, n", [(1, 24, 8), (7, 40, 40), (45, 24, 24), (45, 72, 40)])  # K: partial and several
@pytest.mark.parametrize("sets", [1, 3])  # 45 random rows: most blocks of token rows hold several sets
def test_matches_reference(dtype, ranks, m, k, n, sets):
    _check(_case(m, k, n, sets, ranks, dtype), dtype)


def _sets_per_block(set_of_row: list[int], per_row: int = 1) -> list[set[int]]:
    tokens = [s for s in set_of_row for _ in range(per_row)]
    return [set(tokens[i:i + BLOCK_M]) for i in range(0, len(tokens), BLOCK_M)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_blocks_with_several_sets_and_sets_absent_from_blocks(dtype):
    set_of_row = [0] * 20 + [2] * 20 + [-1] * 10 + [0] * 3  # set 1 in no row, set 0 in two runs
    if INTERPRETED:  # the case is what it claims at the interpreter's tile size
        blocks = _sets_per_block(set_of_row)
        assert blocks[0] == {0} and blocks[1] == {0, 2} and blocks[2] == {2, -1} and blocks[3] == {-1, 0}
    _check(_case(len(set_of_row), 40, 24, 3, (8,), dtype, set_of_row=set_of_row), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens, set_of_row", [(5, [1, 1, 0, -1, 2, 2, 0]), (40, [0, -1, 1])], ids=["short", "long"])
def test_token_rows_and_no_bias(dtype, tokens, set_of_row):
    x, weight, _, a, b, scales, set_of_row = _case(len(set_of_row), 16, 20, 3, (8,), dtype, tokens=tokens,
                                                   set_of_row=set_of_row)
    if INTERPRETED and tokens == 5:  # rows of three sets share one block of token rows
        assert len(_sets_per_block(set_of_row.tolist(), tokens)[1]) == 3
    _check((x, weight, None, a, b, scales, set_of_row), dtype)


def test_metadata_reused_across_layers_of_a_call():
    """Layers of different widths share one RowMapping; the workspace grows once, to the largest layer."""
    mapping = RowMapping.of([0, 0, -1, 1], DEVICE)
    for k, n, tokens in ((32, 40, 6), (16, 24, 6), (32, 40, 3)):
        x, weight, bias, a, b, scales, set_of_row = _case(4, k, n, 2, (4, 8), torch.float32, tokens=tokens,
                                                          set_of_row=[0, 0, -1, 1])
        y = lora_linear_fused(x, weight, bias, LoRAWeights.of(a, b, scales), mapping)
        torch.testing.assert_close(y, lora_linear_reference(x, weight, bias, a, b, scales, set_of_row),
                                   **TOLERANCE[torch.float32])
    assert mapping.workspace.grown == 1


def test_run_tables():
    mapping = RowMapping.of(torch.tensor([0, 0, -1, 2, 2, 1]), "cpu")
    assert mapping.run_start.tolist() == [0, 2, 3, 5, 6] and mapping.run_set.tolist() == [0, -1, 2, 1]
    assert mapping.run_of_row.tolist() == [0, 0, 1, 2, 2, 3] and mapping.set_of_row.tolist() == [0, 0, -1, 2, 2, 1]
    assert mapping.set_of_row.dtype == torch.long and [s for s, _ in mapping.segments] == [0, 1, 2]


def test_padded_weights_are_made_once():
    _, _, _, a, b, scales, _ = _case(2, 16, 8, 2, (12,), torch.float16)
    lora = LoRAWeights.of(a, b, scales)
    pad_a, pad_b = lora.padded
    assert pad_a.shape == (2, 16, 16) and pad_b.shape == (2, 8, 16) and lora.padded[0] is pad_a
    assert torch.equal(pad_a[:, :12], a) and not pad_a[:, 12:].any() and not pad_b[:, :, 12:].any()
    assert lora.scale_floats == tuple(scales.tolist())


def test_bad_shapes_name_the_tensors():
    x, weight, bias, a, b, scales, set_of_row = _case(4, 16, 8, 2, (4,), torch.float32)
    with pytest.raises(ValueError, match=r"lora_b \(2, 8, 3\)"):
        lora_linear_triton(x, weight, bias, a, b[:, :, :3], scales, set_of_row)
    with pytest.raises(ValueError, match=r"x \(4, 16\) has 4 rows but the call's RowMapping has 3"):
        lora_linear_fused(x, weight, bias, LoRAWeights.of(a, b, scales), RowMapping.of([0, 1, -1], DEVICE))


def test_gpu_benchmark_runs_its_paths():
    """bench/lora_kernel_gpu.py needs CUDA to time; its code path runs here on a tiny shape, timed by a stub."""
    from bench.lora_kernel_gpu import shape_figures

    figures = shape_figures(40, 16, 24, bench=lambda fn: fn() is not None, device=DEVICE, dtype=torch.float32)
    assert set(figures) == {f"{p}_over_base_40x16x24" for p in ("fused", "unfused", "wrapper")}
