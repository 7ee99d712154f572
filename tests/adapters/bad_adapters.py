"""Adapter folders broken one way each, copies of the shipped toys: what loading must refuse with an AdapterError
naming the file and the problem. tests/adapters/test_validation.py reads them; tests/serving/test_bad_adapters.py
serves a root holding them beside good ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from distillery.adapters import LORA_FILE, META_FILE, PROJECTION_FILE
from distillery.paths import EMBEDDED_ADAPTERS

TO_Q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # a Linear layer (64 -> 64)


def _meta(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        meta = json.loads((folder / META_FILE).read_text())
        (folder / META_FILE).write_text(json.dumps({**meta, **changes}))
    return edit


def _without(field: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        meta = json.loads((folder / META_FILE).read_text())
        del meta[field]
        (folder / META_FILE).write_text(json.dumps(meta))
    return edit


def _infinite_alpha(folder: Path) -> None:  # JSON has no infinity: a number too large for a float is one
    meta = (folder / META_FILE).read_text()
    (folder / META_FILE).write_text(meta.replace('"alpha": 16.0', '"alpha": 1e999'))


def _meta_bytes(raw: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / META_FILE).write_bytes(raw)


def _tensor(part: str, change: Callable[[torch.Tensor], torch.Tensor], file: str = LORA_FILE) -> Callable[[Path], None]:
    """Change the tensor of `TO_Q` whose key ends with `part` ("A" / "B": its LoRA down / up factor) or, in another
    `file`, the tensor named `part`."""
    suffixes = {"A": (".lora_A.weight", ".lora.down.weight"), "B": (".lora_B.weight", ".lora.up.weight")}

    def edit(folder: Path) -> None:
        tensors = load_file(str(folder / file))
        key = part if file != LORA_FILE else next(
            k for k in tensors if k.startswith(TO_Q) and k.endswith(suffixes[part]))
        tensors[key] = change(tensors[key]).contiguous()
        save_file(tensors, str(folder / file))
    return edit


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


# name: (the shipped adapter it is copied from, how it is broken, what the refusal says beside the file's path).
# The reader refuses all but the last two; those the server refuses at load (the sampling plan's rules).
BAD = {
    "non-utf8": ("stripes-toy", _meta_bytes(b'{"kind": "style\xff\xfe"}'), "is not UTF-8 text"),
    "invalid-json": ("stripes-toy", _meta_bytes(b'{"kind": "style",'), "Invalid JSON"),
    "rank-0": ("stripes-toy", _meta(rank=0), "rank: Input should be greater than or equal to 1 (got 0)"),
    "b-1d": ("stripes-toy", _tensor("B", lambda b: b[:, 0]), "B (64,); the base layer's weight is (64, 64): A must be "
                                                               "2-D and B 2-D"),
    "rank-mismatch": ("stripes-toy", _tensor("A", lambda a: a[:8]), "A (8, 64), B (64, 16)"),
    "unknown-scheduler": ("stripes-toy", _meta(recommended_scheduler="warp-drive"),
                          "recommended_scheduler: scheduler: 'warp-drive' is unknown"),
    "steps-above-cap": ("lcm-toy", _meta(recommended_steps=5000),
                        "recommended_steps: steps: 5000 (adapter 'steps-above-cap''s recommendation) is more than"),
}
SERVER_REFUSED = ("unknown-scheduler", "steps-above-cap")
# Refused by the reader too, tested there only
MORE_BAD = {
    "extra-field": ("stripes-toy", _meta(colour="red"), "colour: unknown field (allowed: kind, base_fingerprint"),
    "mistyped": ("stripes-toy", _meta(rank="16"), "rank: Input should be a valid integer (got '16')"),
    "missing-field": ("stripes-toy", _without("rank"), "rank: Field required"),
    "unknown-kind": ("stripes-toy", _meta(kind="texture"), "kind: Input should be 'guidance', 'consistency'"),
    "infinite-alpha": ("stripes-toy", _infinite_alpha, "alpha: Input should be a finite number"),
    "w-range": ("guidance-toy", _meta(w_min=4.0, w_max=1.0), "w_min 4.0 is above w_max 1.0"),
    "step-0": ("lcm-toy", _meta(steps=[1, 0]), "steps[1]: Input should be greater than or equal to 1 (got 0)"),
    "nan-weights": ("stripes-toy", _tensor("B", _nan), "holds NaN or infinite values"),
    "a-too-wide": ("stripes-toy", _tensor("A", lambda a: torch.cat([a, a[:, :1]], 1)), "A (16, 65), B (64, 16)"),
    "a-3d": ("stripes-toy", _tensor("A", lambda a: a[:, None]), "A must be 2-D and B 2-D for a Linear"),
    "projection-1d": ("guidance-toy", _tensor("weight", lambda w: w[0], PROJECTION_FILE),
                      "expected 'weight' of shape (C, 256)"),
}


def write_bad(root: Path, name: str) -> Path:
    """`root/name`: the broken copy `name` of BAD or MORE_BAD."""
    source, breaks, _ = {**BAD, **MORE_BAD}[name]
    folder = Path(root) / name
    shutil.copytree(EMBEDDED_ADAPTERS / source, folder)
    breaks(folder)
    return folder
