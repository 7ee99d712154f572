"""The torch reference of the per-row LoRA op, checked against a plain per-row loop."""

import pytest
import torch

from distillery.kernels import lora_linear_reference


def _case(m=7, k=12, n=10, s=3, r=4, tokens=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    shape = (m, tokens, k) if tokens else (m, k)
    x = torch.randn(shape, generator=g, dtype=dtype)
    weight, bias = torch.randn(n, k, generator=g, dtype=dtype), torch.randn(n, generator=g, dtype=dtype)
    a, b = torch.randn(s, r, k, generator=g, dtype=dtype), torch.randn(s, n, r, generator=g, dtype=dtype)
    scales = torch.tensor([0.5, 1.0, 2.0][:s])
    set_of_row = torch.tensor([0, -1, 2, 2, 1, -1, 0][:m])
    return x, weight, bias, a, b, scales, set_of_row


@pytest.mark.parametrize("tokens", [None, 5])
@pytest.mark.parametrize("set_of_row", [[0, -1, 2, 2, 1, -1, 0], [1] * 7, [-1] * 7], ids=["mixed", "one-set", "base"])
def test_matches_per_row_loop(tokens, set_of_row):
    x, weight, bias, a, b, scales, _ = _case(tokens=tokens)
    set_of_row = torch.tensor(set_of_row)
    y = lora_linear_reference(x, weight, bias, a, b, scales, set_of_row)
    for i, s in enumerate(set_of_row.tolist()):
        expect = x[i] @ weight.T + bias
        if s >= 0:
            expect = expect + scales[s] * (x[i] @ a[s].T) @ b[s].T
        torch.testing.assert_close(y[i], expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "mutate, names",
    [
        (lambda c: {**c, "weight": c["weight"][:, :5]}, "weight"),
        (lambda c: {**c, "lora_a": c["lora_a"][:, :2]}, "lora_a"),
        (lambda c: {**c, "scales": c["scales"][:2]}, "scales"),
        (lambda c: {**c, "set_of_row": c["set_of_row"][:3]}, "set_of_row"),
        (lambda c: {**c, "lora_b": c["lora_b"].double()}, "lora_b"),
    ],
)
def test_bad_shapes_and_dtypes_name_the_tensors(mutate, names):
    keys = ("x", "weight", "bias", "lora_a", "lora_b", "scales", "set_of_row")
    args = mutate(dict(zip(keys, _case())))
    with pytest.raises(ValueError, match=names):
        lora_linear_reference(*(args[k] for k in keys))
