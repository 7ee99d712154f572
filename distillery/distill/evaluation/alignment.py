"""Oracle alignment: the fraction of generated images whose colour AND shape match the prompt."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from distillery.distill.toy.data import TRAIN_COMBOS, eval_prompts
from distillery.distill.toy.oracle import load_oracle
from distillery.model import DiffusionModel
from distillery.sampling.pipeline import generate


@lru_cache(maxsize=1)
def _oracle():
    return load_oracle()


def eval_images(model: DiffusionModel, n: int = 200, guidance: float = 0.0, steps: int = 25, combos=TRAIN_COMBOS,
                batch: int = 50, scheduler: str | None = None, rescale: float = 0.0, adapters=(),
                registry=None) -> tuple[list[Image.Image], list]:
    """Images for `n` fixed prompts, image i seeded with i (the same prompts and seeds every call).
    Adapters need the registry they were loaded into; the model itself is never changed."""
    prompts = eval_prompts(n, combos)
    images = []
    for start in range(0, n, batch):
        chunk = prompts[start : start + batch]
        images += generate(model, [p for p, _, _ in chunk], list(range(start, start + len(chunk))), guidance, steps,
                           scheduler=scheduler, rescale=rescale, adapters=adapters, registry=registry).images
    return images, prompts


def alignment_of(images: list[Image.Image], prompts: list) -> float:
    judged = _oracle().classify(images)
    return sum(j == (c, s) for j, (_, c, s) in zip(judged, prompts)) / len(prompts)


def alignment(model: DiffusionModel, n: int = 200, **kwargs) -> float:
    return alignment_of(*eval_images(model, n, **kwargs))


def psnr(a: list[Image.Image], b: list[Image.Image]) -> float:
    """Mean PSNR (dB, 8-bit) between paired images."""
    values = []
    for x, y in zip(a, b):
        mse = np.mean((np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)) ** 2)
        values.append(99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse))
    return float(np.mean(values))
