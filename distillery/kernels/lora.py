"""LoRA linear with a per-row adapter set: the torch reference (CPU path and test oracle).

Punica / S-LoRA (arXiv 2310.18547, 2311.03285) batch different adapters in one matmul;
this is the same op for diffusion serving, where the rows of one UNet call belong to
different requests, each with its own (composed) adapter set.

Words: a row is one image row of the UNet call (x's leading dim); its tokens, flattened, are
token rows (M = rows x T). The call's distinct adapter sets are numbered by set index s in
[0, S); `set_of_row[r]` is row r's (-1: base only). A segment is a set index with its rows.

Semantics:
    y[r] = x[r] @ W0^T + bias + scales[s] * (x[r] @ A[s]^T) @ B[s]^T    with s = set_of_row[r]
    rows with s = -1 get the base only.
Shape:
    x (rows, K) or (rows, T, K); weight (N_out, K); bias (N_out,) or None; lora_a (S, R, K);
    lora_b (S, N_out, R); scales (S,); set_of_row (rows,) int64 in [-1, S).
A set of several adapters is rank-concatenated into one set index: A = [A1; A2], B = [s1 B1, s2 B2],
padded with zeros to the largest rank R of the call (zero rows/columns of A, B add nothing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_lora_args(x, weight, bias, lora_a, lora_b, scales, set_of_row) -> None:
    """ValueError naming the tensors and their shapes when they do not fit together."""
    k = x.shape[-1]
    shapes = _Shapes(x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, scales=scales, set_of_row=set_of_row)
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight must be (N, K) with K = x.shape[-1]; got {shapes}")
    if lora_a.dim() != 3 or lora_b.dim() != 3 or lora_a.shape[2] != k or lora_b.shape[1] != weight.shape[0] \
            or lora_a.shape[0] != lora_b.shape[0] or lora_a.shape[1] != lora_b.shape[2]:
        raise ValueError(f"lora_a must be (S, R, K) and lora_b (S, N, R); got {shapes}")
    if set_of_row.dim() != 1 or set_of_row.shape[0] != x.shape[0] or set_of_row.dtype != torch.long:
        raise ValueError(f"set_of_row must be int64 (x.shape[0],); got {shapes}, dtype {set_of_row.dtype}")
    _check_bias_scales_dtypes(x, weight, bias, lora_a, lora_b, scales, shapes)


def check_lora_conv_args(x, weight, bias, lora_a, lora_b, scales) -> None:
    """ValueError naming the tensors and their shapes when a k x k conv LoRA's tensors do not fit."""
    shapes = _Shapes(x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, scales=scales)
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"x must be (n, C, H, W) and weight (N, C, k, k); got {shapes}")
    if lora_a.dim() != 5 or lora_a.shape[2:] != weight.shape[1:] or lora_b.dim() != 3 \
            or lora_b.shape[:2] != (lora_a.shape[0], weight.shape[0]) or lora_b.shape[2] != lora_a.shape[1]:
        raise ValueError(f"lora_a must be (S, R, C, k, k) and lora_b (S, N, R); got {shapes}")
    _check_bias_scales_dtypes(x, weight, bias, lora_a, lora_b, scales, shapes)


def _check_bias_scales_dtypes(x, weight, bias, lora_a, lora_b, scales, shapes) -> None:
    """The checks the linear and the conv op share."""
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be (N,) = ({weight.shape[0]},); got bias {tuple(bias.shape)}")
    if scales.shape != (lora_a.shape[0],):
        raise ValueError(f"scales must be (S,) = ({lora_a.shape[0]},); got {shapes}")
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}")


def segments_of(set_of_row, with_base: bool = False) -> list[tuple[int, slice | torch.Tensor | None]]:
    """(set index, rows) per set index >= 0 present (and -1 too, `with_base`), in index order. rows: None when
    the set covers every row, a slice when its rows are contiguous (callers that group rows by set get views,
    no gathers), else an index tensor. `set_of_row`: a list of ints (no device sync) or an int64 tensor."""
    sets_of_rows = set_of_row.tolist() if isinstance(set_of_row, torch.Tensor) else list(set_of_row)
    present = sorted({s for s in sets_of_rows if with_base or s >= 0})
    if len(present) == 1 and all(s == present[0] for s in sets_of_rows):
        return [(present[0], None)]
    segments = []
    for s in present:
        rows = [i for i, si in enumerate(sets_of_rows) if si == s]
        first, last = rows[0], rows[-1]
        segments.append((s, slice(first, last + 1) if last - first + 1 == len(rows) else torch.tensor(rows)))
    return segments


def gather_rows(x: torch.Tensor, rows) -> torch.Tensor:
    return x if rows is None else x[rows] if isinstance(rows, slice) else x.index_select(0, rows.to(x.device))


def copy_to_rows(y: torch.Tensor, rows, part: torch.Tensor) -> None:
    """y[rows] = part."""
    if rows is None:
        y.copy_(part)
    elif isinstance(rows, slice):
        y[rows].copy_(part)
    else:
        y.index_copy_(0, rows.to(y.device), part)


def add_to_rows(y: torch.Tensor, rows, delta: torch.Tensor) -> None:
    """y[rows] += delta, one rounding per element whichever form rows take."""
    if rows is None:
        y.add_(delta)
    elif isinstance(rows, slice):
        y[rows].add_(delta)
    else:
        y.index_add_(0, rows.to(y.device), delta)


class _Shapes:
    """Formats the tensors' shapes only when an error message needs them (this runs per layer call)."""

    def __init__(self, **tensors):
        self.tensors = tensors

    def __str__(self) -> str:
        return ", ".join(f"{n} {tuple(t.shape)}" for n, t in self.tensors.items())


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, scales: torch.Tensor, set_of_row: torch.Tensor,
                          segments: list[tuple[int, torch.Tensor | None]] | None = None) -> torch.Tensor:
    """`segments` (from `segments_of(set_of_row)`) may be passed to skip recomputing them per layer."""
    check_lora_args(x, weight, bias, lora_a, lora_b, scales, set_of_row)
    return lora_apply(x, weight, bias, lora_a, lora_b, scales.tolist(),
                      segments if segments is not None else segments_of(set_of_row))


def lora_apply(x, weight, bias, lora_a, lora_b, scales, segments, ranks=None) -> torch.Tensor:
    """The reference's arithmetic without argument checks: the serving layers' hot path (their
    shapes were checked when the adapter was loaded).

    `scales`: per set index, Python floats (read once per composition, never per layer: on CUDA a
    `.tolist()` here would sync per layer). `ranks` (per set index) skips the zero padding of composed
    sets. Several sets in one call: every set at once (`_add_lora_all_sets`: two GEMMs and a mask
    instead of a loop of gathers and small GEMMs).
    """
    y = F.linear(x, weight, bias)  # (rows, [T,] N_out)
    if len(segments) > 1:
        return _add_lora_all_sets(y, x, lora_a, lora_b, scales, segments)
    return _add_lora_terms(y, x, scales, segments, ranks if ranks is not None else [lora_a.shape[1]] * lora_a.shape[0],
                           lambda xs, s, r: F.linear(F.linear(xs, lora_a[s, :r]), lora_b[s, :, :r]))  # rank-r bottleneck


def _add_lora_all_sets(y, x, lora_a, lora_b, scales, segments) -> torch.Tensor:
    """y += per row: scales[s] (x A[s]^T) B[s]^T, all sets in one pass: every row is shrunk by every
    set's A (S R columns: cheap next to the base GEMM, R being small), the columns of other sets are
    zeroed, and one GEMM expands with [scales[0] B[0], ..., scales[S-1] B[S-1]]."""
    n_sets, rank, k = lora_a.shape
    t = F.linear(x, lora_a.reshape(n_sets * rank, k))  # (rows, [T,] S R)
    keep = t.new_zeros(x.shape[0], n_sets, rank)
    for s, rows in segments:
        keep[rows if rows is not None else slice(None), s] = 1.0
    t = t * keep.view(x.shape[0], *([1] * (x.dim() - 2)), n_sets * rank)
    if any(s != 1.0 for s in scales):  # the registry folds scales into B: 1.0 there, no tensor made
        lora_b = lora_b * lora_b.new_tensor(scales)[:, None, None]
    b = lora_b.permute(1, 0, 2).reshape(lora_b.shape[1], n_sets * rank)  # (N, S R)
    return y.add_(F.linear(t, b))


def over_channels(x: torch.Tensor, linear) -> torch.Tensor:
    """A linear map over the channels of (n, C, H, W): `linear` sees (n, H W, C) token rows (a 1 x 1
    convolution is one), so 1 x 1 convolutions take the per-row LoRA op like a Linear."""
    n, c, height, width = x.shape
    y = linear(x.permute(0, 2, 3, 1).reshape(n, height * width, c))  # (n, H W, N)
    return y.view(n, height, width, -1).permute(0, 3, 1, 2).contiguous()


def _add_lora_terms(y, x, scales, segments, ranks, term) -> torch.Tensor:
    """y[rows] += scale * term(x[rows], s, rank) for each set index s's rows (punica's SGMV, in torch); a
    set that leaves this layer alone has rank 0. `scales`: Python floats per set index."""
    for s, rows in segments:
        if ranks[s] == 0:
            continue
        delta = term(gather_rows(x, rows), s, ranks[s])
        if scales[s] != 1.0:
            delta = delta * scales[s]
        add_to_rows(y, rows, delta)
    return y


def lora_conv2d_reference(x, weight, bias, lora_a, lora_b, scales, segments, ranks=None, stride=1, padding=0,
                          dilation=1, check: bool = True) -> torch.Tensor:
    """LoRA on a k x k convolution (peft's layout: A a k x k conv to R channels, B a 1 x 1 conv back),
    per-row adapter sets like `lora_apply`. Torch only: the Triton kernel covers linear and 1 x 1 layers.

    x (n, C, H, W); weight (N_out, C, k, k); lora_a (S, R, C, k, k); lora_b (S, N_out, R); scales (S,),
    a tensor or Python floats (the serving layers pass floats: no read back per layer).
    """
    if check:
        check_lora_conv_args(x, weight, bias, lora_a, lora_b, scales)
    if isinstance(scales, torch.Tensor):
        scales = scales.tolist()
    y = F.conv2d(x, weight, bias, stride, padding, dilation)

    def term(xs, s, r):  # A: a k x k conv to r channels; B: a 1 x 1 conv back
        h = F.conv2d(xs, lora_a[s, :r], None, stride, padding, dilation)  # (n, r, H', W')
        return F.conv2d(h, lora_b[s, :, :r, None, None])

    return _add_lora_terms(y, x, scales, segments, ranks if ranks is not None else [lora_a.shape[1]] * lora_a.shape[0], term)
