"""Linear and convolution whose per-row results do not depend on the rest of the batch.

Step-level batching puts rows of unrelated requests into one UNet call; a request's image must
come out bit-identical whatever shares its call. Stock CPU kernels break that in two places,
measured on this project's CPU (tests/kernels/test_batch_invariant.py checks both):
  - GEMM with few rows (the timestep-embedding layers see one row per image): MKL's path for
    x (M, K) @ W^T depends on M, so row 0 of M = 3 differs from M = 1 in the last bits. A
    batched GEMM with one row per batch entry computes every row with the same M = 1 call.
    Token-level layers (M = images x tokens, >= 16 per image) come out the same for every M.
  - convolution: for one image ATen takes its own slow_conv2d path, for several it calls
    oneDNN, and the two round differently. Each layer uses one method for every batch size:
    large convolutions call oneDNN directly (an image's bits are then the same at every batch
    size and position, at each UNet shape tested, and oneDNN is the faster one there); small
    ones (below SMALL_CONV_MACS per image: the toy's) go one image at a time through ATen's own
    path, since oneDNN's fixed cost per call made a one-image call ~3x slower there, and a
    single-eval request is one image. Other devices and dtypes: one image at a time.
On CUDA: batched GEMMs with one row each, one image per convolution; not measured here (no GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, batch-invariant: 2-D inputs (one row per image) go through one M = 1 GEMM per row."""
    if x.dim() != 2:
        return F.linear(x, weight, bias)
    rows, w_t = x.shape[0], weight.T.expand(x.shape[0], *weight.T.shape)  # (rows, K, N), a view
    if bias is None:
        return torch.bmm(x[:, None, :], w_t)[:, 0]
    return torch.baddbmm(bias.expand(rows, 1, bias.shape[0]), x[:, None, :], w_t)[:, 0]


def over_channels(x: torch.Tensor, linear) -> torch.Tensor:
    """A linear map over the channels of (n, C, H, W): `linear` sees (n, H W, C) token rows, as a
    token-level layer does (a 1 x 1 convolution is one)."""
    n, c, h, w = x.shape
    y = linear(x.permute(0, 2, 3, 1).reshape(n, h * w, c))
    return y.view(n, h, w, -1).permute(0, 3, 1, 2).contiguous()


SMALL_CONV_MACS = 50_000_000  # per image; SD-1.5's convolutions are all above, the toy's all below


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> torch.Tensor:
    """F.conv2d, batch-invariant: one method per layer shape, whatever the batch size."""
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    if _onednn(x, padding) and _macs_per_image(x, weight, pair(stride)) >= SMALL_CONV_MACS:
        return torch.mkldnn_convolution(x.contiguous(), weight, bias, pair(padding), pair(stride), pair(dilation), groups)
    if x.shape[0] == 1:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return torch.cat([F.conv2d(image, weight, bias, stride, padding, dilation, groups) for image in x.split(1)])


def _macs_per_image(x: torch.Tensor, weight: torch.Tensor, stride: list[int]) -> int:
    return weight.numel() * (x.shape[2] // stride[0]) * (x.shape[3] // stride[1])


def _onednn(x: torch.Tensor, padding) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and not isinstance(padding, str) \
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
