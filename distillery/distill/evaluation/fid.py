"""FID with the oracle's penultimate features: a quality figure that sees blur and lost detail.

Oracle alignment saturates near 0.99 and cannot tell a sharp image from a soft one; the
Frechet distance between feature distributions can. torchmetrics' `FrechetInceptionDistance`
takes the oracle's 128-d feature trunk as its extractor (the distance itself is the library's).
The reference is fresh renders of the evaluation prompts' distribution, from seeds nothing else
uses; its floor, `fid_real`, is another set of fresh renders against it.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from distillery.distill.toy.data import TRAIN_COMBOS, sample
from distillery.distill.toy.oracle import load_oracle

REFERENCE_SEED = 20_000_000  # renders for the reference set
FLOOR_SEED = 21_000_000  # another set of renders: the floor


class OracleFeatures(nn.Module):
    """(B, 3, H, W) in [0, 1] -> the oracle's (B, 128) penultimate features."""

    num_features = 128

    def __init__(self):
        super().__init__()
        self.trunk = load_oracle().features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x * 2 - 1)


def renders(n: int, first_seed: int, combos=TRAIN_COMBOS) -> list[Image.Image]:
    """`n` ground-truth renders of the toy distribution over `combos`."""
    return [sample(first_seed + i, combos).image for i in range(n)]


def _tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).float() / 255


class FidReference:
    """FID of image sets against one reference set, whose features are computed once."""

    def __init__(self, reference: list[Image.Image], batch: int = 500):
        self.batch = batch
        self.metric = FrechetInceptionDistance(feature=OracleFeatures(), normalize=True, reset_real_features=False)
        self._update(reference, real=True)

    @classmethod
    def of_renders(cls, n: int = 1000, combos=TRAIN_COMBOS) -> FidReference:
        return cls(renders(n, REFERENCE_SEED, combos))

    def _update(self, images: list[Image.Image], real: bool) -> None:
        for start in range(0, len(images), self.batch):
            self.metric.update(_tensor(images[start : start + self.batch]), real=real)

    @torch.no_grad()
    def fid(self, images: list[Image.Image]) -> float:
        self.metric.reset()  # the generated side only (reset_real_features=False)
        self._update(images, real=False)
        return float(self.metric.compute())

    def floor(self, n: int = 1000, combos=TRAIN_COMBOS) -> float:
        """`fid_real`: fresh renders against the reference: the best a generator can score here."""
        return self.fid(renders(n, FLOOR_SEED, combos))
