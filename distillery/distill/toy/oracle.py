"""The oracle: which colour and which shape a 32x32 toy image shows, decided from pixels.

A tiny CNN trained on ground-truth renders (all colour-shape combinations, held-out ones
included: the oracle is a measuring instrument, not the model under test), with noise
and blur augmentation so slightly soft generated images are judged fairly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from distillery.atomic import atomic_file
from distillery.distill.toy.arrays import to_model_range, toy_arrays
from distillery.distill.toy.data import COLOURS, SHAPES
from distillery.paths import ORACLE_FILE

ALL_COMBOS = tuple((c, s) for c in COLOURS for s in SHAPES)
COLOUR_NAMES = tuple(COLOURS)


class Oracle(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
        )
        self.colour_head = nn.Linear(128, len(COLOURS))
        self.shape_head = nn.Linear(128, len(SHAPES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)  # x: (B, 3, 32, 32) in [-1, 1]
        return self.colour_head(h), self.shape_head(h)

    @torch.no_grad()
    def classify(self, images: list[Image.Image]) -> list[tuple[str, str]]:
        x = torch.from_numpy(to_model_range(np.stack([np.asarray(im.convert("RGB").resize((32, 32))) for im in images])))
        colour_logits, shape_logits = self(x)
        return [(COLOUR_NAMES[c], SHAPES[s]) for c, s in zip(colour_logits.argmax(1).tolist(), shape_logits.argmax(1).tolist())]


def load_oracle(path: Path = ORACLE_FILE) -> Oracle:
    oracle = Oracle()
    oracle.load_state_dict(load_file(str(path)))
    return oracle.eval()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(b, 1, 1, 1, generator=gen) * 0.7
    x = (1 - mix) * x + mix * blur
    return x + torch.randn(x.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 0.15


def train_oracle(out: Path = ORACLE_FILE, n: int = 30_000, steps: int = 1500, batch: int = 128, cache: Path = Path(".work/oracle")) -> Oracle:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    data = toy_arrays(n, cache, first_seed=30_000_000, combos=ALL_COMBOS)
    x_all = torch.from_numpy(to_model_range(data["images"]))
    colour_idx = torch.tensor([COLOUR_NAMES.index(c) for c in data["colours"]])
    shape_idx = torch.tensor([SHAPES.index(s) for s in data["shapes"]])
    oracle = Oracle()
    opt = torch.optim.AdamW(oracle.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in (bar := tqdm(range(steps), desc="oracle")):
        idx = torch.randint(0, n, (batch,), generator=gen)
        colour_logits, shape_logits = oracle(_augment(x_all[idx], gen))
        loss = F.cross_entropy(colour_logits, colour_idx[idx]) + F.cross_entropy(shape_logits, shape_idx[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    with atomic_file(out) as tmp:
        save_file({k: v.contiguous() for k, v in oracle.state_dict().items()}, str(tmp))
    return oracle.eval()
