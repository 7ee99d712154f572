"""toy_quality: oracle alignment of the CFG teacher over guidance weights (25 DDIM steps)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.references import alignment
from distillery.distill.toy.data import HELDOUT_COMBOS
from distillery.model import DEFAULTS_FILE, DiffusionModel
from distillery.paths import EMBEDDED_MODEL

WEIGHTS = (0, 1, 2, 3, 5)


def run(quick: bool = False) -> dict:
    return teacher_sweep(EMBEDDED_MODEL, quick, "toy_quality")


def teacher_sweep(folder: Path, quick: bool, bench: str) -> dict:
    """The CFG teacher's alignment at each w; the best w becomes the model's default guidance (full runs)."""
    model = DiffusionModel.from_pretrained(folder)
    n, steps, weights = (8, 3, (0, 1)) if quick else (200, 25, WEIGHTS)
    figures = {}
    t0 = time.perf_counter()
    for w in weights:
        # rendered here whatever the run holds (reuse=False): seconds_per_image times them; kept for the others
        figures[f"alignment_w{w}"] = alignment(model, n=n, guidance=float(w), steps=steps, reuse=False)
    seconds_per_image = (time.perf_counter() - t0) / (n * len(weights))
    best_w = max(weights, key=lambda w: figures[f"alignment_w{w}"])
    figures["best_w"] = best_w
    figures["heldout_alignment_best"] = alignment(model, n=n, guidance=float(best_w), steps=steps, combos=HELDOUT_COMBOS)
    figures["seconds_per_image"] = seconds_per_image
    figures["prompts"] = n
    if not quick:  # the measured best w becomes the model's default guidance
        (folder / DEFAULTS_FILE).write_text(json.dumps(
            {"guidance": float(best_w), "steps": steps, "scheduler": "ddim",
             "source": f"make bench BENCH={bench}", "alignment": figures[f"alignment_w{best_w}"]}, indent=1) + "\n")
    return figures
