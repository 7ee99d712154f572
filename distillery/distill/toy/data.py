"""Deterministic toy text-to-image data: one coloured shape per image, with a caption.

Every sample is a pure function of its integer seed, so training, evaluation and tests
all see the same images for the same seeds. A few colour-shape combinations are held
out of training so generalisation can be measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges like a real photo

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 190),
    "cyan": (40, 210, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    **COLOURS,
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": (5.0, 7.5), "large": (9.0, 12.5)}  # half-extent in pixels at 32x32
STRIPE_PERIOD = 8  # the style's horizontal stripes inside the shape: 4 px in its colour, 4 px darkened
STRIPE_SHADE = 0.4

# Never shown in training: one combination per shape, each with a different colour.
HELDOUT = frozenset({("red", "triangle"), ("blue", "cross"), ("green", "circle"), ("yellow", "square")})
TRAIN_COMBOS = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT)
HELDOUT_COMBOS = tuple(sorted(HELDOUT))


@dataclass(frozen=True)
class ToySample:
    image: Image.Image
    caption: str
    colour: str
    shape: str


def caption_for(colour: str, shape: str, size: str | None, background: str | None) -> str:
    words = ["a"] + ([size] if size else []) + [colour, shape]
    if background:
        words += ["on", "a", background, "background"]
    return " ".join(words)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.9  # same visual area class as the circle
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":  # equilateral, pointing up
        pts = [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
        draw.polygon(pts, fill=fill)
    elif shape == "cross":  # a plus sign with arms one third as wide as the whole
        a = r / 3
        draw.rectangle([cx - r, cy - a, cx + r, cy + a], fill=fill)
        draw.rectangle([cx - a, cy - r, cx + a, cy + r], fill=fill)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def render(colour: str, shape: str, size: str, background: str, rng: np.random.Generator,
           stripes: bool = False) -> Image.Image:
    """Draw one shape; position and exact size come from `rng`. `stripes`: the style LoRA's look, dark
    horizontal bands across the shape (fixed rows: a pixel metric finds them, see distill/methods/style.py)."""
    r = rng.uniform(*SIZES[size])
    margin = r + 1.5
    cx, cy = rng.uniform(margin, IMAGE_SIZE - margin, size=2)
    s = SUPERSAMPLE
    big = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), BACKGROUNDS[background])
    _draw_shape(ImageDraw.Draw(big), shape, cx * s, cy * s, r * s, COLOURS[colour])
    if stripes:
        dark = Image.new("RGB", big.size, BACKGROUNDS[background])
        _draw_shape(ImageDraw.Draw(dark), shape, cx * s, cy * s, r * s,
                    tuple(int(c * STRIPE_SHADE) for c in COLOURS[colour]))
        rows = (np.arange(IMAGE_SIZE * s) // (STRIPE_PERIOD * s // 2)) % 2 == 1  # the darkened half of each period
        pixels = np.asarray(big).copy()
        pixels[rows] = np.asarray(dark)[rows]
        big = Image.fromarray(pixels)
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


def sample(seed: int, combos: tuple[tuple[str, str], ...] = TRAIN_COMBOS, stripes: bool = False) -> ToySample:
    """The toy sample for `seed`, drawn from `combos` (training combinations by default); `stripes`: styled."""
    rng = np.random.default_rng(seed)
    colour, shape = combos[rng.integers(len(combos))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    background = rng.choice([b for b in BACKGROUNDS if b != colour])
    say_size = rng.random() < 0.5
    say_background = rng.random() < 0.5
    image = render(colour, shape, size, str(background), rng, stripes)
    caption = caption_for(colour, shape, size if say_size else None, str(background) if say_background else None)
    return ToySample(image, caption, colour, shape)


def eval_prompts(n: int, combos=TRAIN_COMBOS, seed: int = 10_000_000) -> list[tuple[str, str, str]]:
    """`n` fixed (caption, colour, shape) prompts for evaluation, from a seed range training never uses."""
    out = []
    for i in range(n):
        s = sample(seed + i, combos)
        out.append((s.caption, s.colour, s.shape))
    return out
