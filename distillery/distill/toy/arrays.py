"""Cached arrays of toy samples for training (uint8 images, captions, labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from distillery.atomic import atomic_file
from distillery.distill.toy.data import TRAIN_COMBOS, sample


def toy_arrays(n: int, cache_dir: Path, first_seed: int = 0, combos=TRAIN_COMBOS, stripes: bool = False
               ) -> dict[str, np.ndarray]:
    """`n` samples from seeds first_seed.. as arrays (`stripes`: the style's variant), cached under `cache_dir`."""
    path = Path(cache_dir) / f"toy_{first_seed}_{n}_{len(combos)}{'_stripes' if stripes else ''}.npz"
    if path.exists():
        with np.load(path) as f:
            return dict(f)
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)  # (N, H, W, 3)
    captions, colours, shapes = [], [], []
    for i in tqdm(range(n), desc=f"rendering {n} toy images", mininterval=2):
        s = sample(first_seed + i, combos, stripes)
        images[i] = np.asarray(s.image)
        captions.append(s.caption)
        colours.append(s.colour)
        shapes.append(s.shape)
    arrays = {"images": images, "captions": np.array(captions), "colours": np.array(colours), "shapes": np.array(shapes)}
    with atomic_file(path) as tmp, open(tmp, "wb") as f:  # a killed render leaves no torn cache behind
        np.savez(f, **arrays)
    return arrays


def to_model_range(images_uint8: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    return images_uint8.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
