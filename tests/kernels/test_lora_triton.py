"""The Triton kernel against the torch reference: dtype x rank x M x N x adapters (interpreter on CPU)."""

import pytest
import torch

from distillery.kernels import lora_linear_reference
from distillery.kernels.lora_triton import lora_linear_triton

TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=2e-2),
             torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}
DTYPES = [torch.float32, torch.float16,  # bf16: GPU only, a visible skip elsewhere (not a silently missing case)
          pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="bfloat16 Triton kernel: needs a CUDA GPU"))]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(m, k, n, slots, ranks, dtype, tokens=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = max(ranks)
    a = torch.zeros(slots, r, k)
    b = torch.zeros(slots, n, r)
    for s in range(slots):  # ragged: slot s uses ranks[s % len] of the padded r (composed sets look like this)
        rs = ranks[s % len(ranks)]
        a[s, :rs] = torch.randn(rs, k, generator=g) / k**0.5
        b[s, :, :rs] = torch.randn(n, rs, generator=g) / rs**0.5
    x = torch.randn((m, tokens, k) if tokens else (m, k), generator=g)
    weight = torch.randn(n, k, generator=g) / k**0.5
    bias = torch.randn(n, generator=g)
    rows = torch.randint(-1, slots, (m,), generator=g)
    scales = torch.rand(slots, generator=g) + 0.5
    to = dict(device=DEVICE, dtype=dtype)
    return x.to(**to), weight.to(**to), bias.to(**to), a.to(**to), b.to(**to), scales.to(DEVICE), rows.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ranks", [(4,), (16,), (4, 12)], ids=["r4", "r16", "ragged"])
@pytest.mark.parametrize("m, n", [(1, 8), (7, 40), (45, 24)])  # 45 rows: slot segments split a 32-row tile
@pytest.mark.parametrize("slots", [1, 3])
def test_matches_reference(dtype, ranks, m, n, slots):
    args = _case(m, 24, n, slots, ranks, dtype)
    expected = lora_linear_reference(*[t.float() if t.is_floating_point() else t for t in args])
    torch.testing.assert_close(lora_linear_triton(*args).float(), expected, **TOLERANCE[dtype])


def test_token_rows_and_no_bias():
    x, weight, _, a, b, scales, rows = _case(3, 16, 20, 2, (8,), torch.float32, tokens=5)
    torch.testing.assert_close(lora_linear_triton(x, weight, None, a, b, scales, rows),
                               lora_linear_reference(x, weight, None, a, b, scales, rows), rtol=1e-4, atol=1e-4)


def test_bad_shapes_name_the_tensors():
    x, weight, bias, a, b, scales, rows = _case(4, 16, 8, 2, (4,), torch.float32)
    with pytest.raises(ValueError, match=r"lora_b \(2, 8, 3\)"):
        lora_linear_triton(x, weight, bias, a, b[:, :, :3], scales, rows)
