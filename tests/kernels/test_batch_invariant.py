"""A row's result must not depend on what else is in the batch (step-level batching shares UNet
calls between requests). Stock CPU kernels fail this; kernels.batch_invariant must not."""

import pytest
import torch
import torch.nn.functional as F

from kernels import batch_invariant, lora_apply, lora_conv2d_reference, segments_of

BATCHES = [(1, 0), (2, 1), (3, 0), (5, 3), (8, 7), (17, 9)]  # (batch size, position of the probe row)


def _probe_everywhere(op, row: torch.Tensor, seed: int = 0) -> list[tuple[int, int]]:
    """(n, position) pairs where the probe row's result differs from its result alone."""
    alone = op(row[None])[0]
    g = torch.Generator().manual_seed(seed)
    bad = []
    for n, pos in BATCHES:
        batch = torch.randn(n, *row.shape, generator=g)
        batch[pos] = row
        if not torch.equal(op(batch)[pos], alone):
            bad.append((n, pos))
    return bad


@pytest.mark.parametrize("k, n", [(64, 256), (320, 1280), (1280, 320)])
def test_linear_on_one_row_per_image(k, n):
    w, b = torch.randn(n, k), torch.randn(n)
    row = torch.randn(k)
    assert _probe_everywhere(lambda x: batch_invariant.linear(x, w, b), row) == []
    assert _probe_everywhere(lambda x: batch_invariant.linear(x, w), row) == []
    # what it replaces does depend on the batch here: the test can fail
    assert _probe_everywhere(lambda x: F.linear(x, w, b), row) != []


@pytest.mark.parametrize("tokens", [16, 64, 256])
def test_linear_on_token_rows(tokens):
    w = torch.randn(96, 64)
    assert _probe_everywhere(lambda x: batch_invariant.linear(x, w), torch.randn(tokens, 64)) == []


@pytest.mark.parametrize("c_in, c_out, size, k, stride", [
    (4, 32, 16, 3, 1), (32, 32, 16, 3, 2), (32, 64, 16, 3, 1), (64, 96, 8, 3, 1), (192, 96, 4, 3, 1), (64, 64, 16, 1, 1),
    (320, 320, 16, 3, 1)])
def test_conv2d(c_in, c_out, size, k, stride):
    w, b = torch.randn(c_out, c_in, k, k) * 0.1, torch.randn(c_out)
    op = lambda x: batch_invariant.conv2d(x, w, b, stride, k // 2)  # noqa: E731
    assert _probe_everywhere(op, torch.randn(c_in, size, size)) == []
    torch.testing.assert_close(op(torch.randn(2, c_in, size, size, generator=torch.Generator().manual_seed(1))),
                               F.conv2d(torch.randn(2, c_in, size, size, generator=torch.Generator().manual_seed(1)),
                                        w, b, stride, k // 2), rtol=1e-4, atol=1e-4)


def test_stock_conv2d_differs_between_one_image_and_several():
    """Why batch_invariant.conv2d exists: ATen's own dispatch rounds one image differently."""
    w = torch.randn(64, 32, 3, 3)
    assert _probe_everywhere(lambda x: F.conv2d(x, w, padding=1), torch.randn(32, 16, 16)) != []


def _composed(rank_probe: int, rank_other: int, k_shape: tuple, n_out: int):
    """Slot 0: the probe's adapter alone; slot 1 (another request's) has a larger rank, so slot 0 is
    zero-padded in the stacked tensors; `ranks` must make that padding irrelevant."""
    g = torch.Generator().manual_seed(2)
    r = max(rank_probe, rank_other)
    a = torch.zeros(2, r, *k_shape)
    b = torch.zeros(2, n_out, r)
    a[0, :rank_probe], b[0, :, :rank_probe] = torch.randn(rank_probe, *k_shape, generator=g), torch.randn(n_out, rank_probe, generator=g)
    a[1], b[1] = torch.randn(r, *k_shape, generator=g), torch.randn(n_out, r, generator=g)
    return a, b, (rank_probe, r)


@pytest.mark.parametrize("x_shape", [(128,), (64, 128)])
def test_lora_rows_round_the_same_alone_and_beside_another_slot(x_shape):
    w = torch.randn(96, 128)
    a, b, ranks = _composed(4, 16, (128,), 96)
    probe = torch.randn(*x_shape)
    alone = lora_apply(probe[None], w, None, a[:1, :4], b[:1, :, :4], torch.ones(1), [(0, None)])[0]
    x = torch.stack([torch.randn(*x_shape), probe, torch.randn(*x_shape)])
    slots = torch.tensor([1, 0, -1])
    mixed = lora_apply(x, w, None, a, b, torch.ones(2), segments_of(slots), ranks)
    assert torch.equal(mixed[1], alone)


def test_conv_lora_rows_round_the_same_alone_and_beside_another_slot():
    w = torch.randn(32, 16, 3, 3)
    a, b, ranks = _composed(4, 8, (16, 3, 3), 32)
    probe = torch.randn(16, 8, 8)
    alone = lora_conv2d_reference(probe[None], w, None, a[:1, :4], b[:1, :, :4], torch.ones(1), [(0, None)],
                                  None, 1, 1)[0]
    x = torch.stack([probe, torch.randn(16, 8, 8), torch.randn(16, 8, 8)])
    mixed = lora_conv2d_reference(x, w, None, a, b, torch.ones(2), segments_of(torch.tensor([0, 1, 1])), ranks, 1, 1)
    assert torch.equal(mixed[0], alone)
    expected = F.conv2d(probe[None], w, padding=1) + F.conv2d(F.conv2d(probe[None], a[0, :4], padding=1),
                                                              b[0, :, :4, None, None])
    torch.testing.assert_close(alone, expected[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad, names", [("lora_a", "lora_a"), ("lora_b", "lora_b"), ("weight", "weight"),
                                        ("dtype", "lora_b is torch.float64")])
def test_conv_lora_bad_shapes_name_the_tensors(bad, names):
    args = dict(x=torch.randn(2, 16, 8, 8), weight=torch.randn(32, 16, 3, 3), bias=None,
                lora_a=torch.randn(1, 4, 16, 3, 3), lora_b=torch.randn(1, 32, 4), scales=torch.ones(1))
    if bad == "dtype":
        args["lora_b"] = args["lora_b"].double()
    else:
        args[bad] = args[bad][..., :2] if bad != "lora_b" else args[bad][:, :5]
    with pytest.raises(ValueError, match=names):
        lora_conv2d_reference(*args.values(), [(0, None)])
