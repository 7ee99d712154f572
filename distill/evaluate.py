"""Oracle alignment: the fraction of generated images whose colour AND shape match the prompt."""

from __future__ import annotations

from functools import lru_cache

from distill.oracle import load_oracle
from distill.toy_data import TRAIN_COMBOS, eval_prompts
from server.model import DiffusionModel
from server.pipeline import generate


@lru_cache(maxsize=1)
def _oracle():
    return load_oracle()


def alignment(model: DiffusionModel, n: int = 200, guidance: float = 0.0, steps: int = 25, combos=TRAIN_COMBOS,
              batch: int = 50, scheduler: str = "ddim", rescale: float = 0.0) -> float:
    """Alignment over `n` fixed prompts, image i seeded with i (the same prompts and seeds every call)."""
    prompts = eval_prompts(n, combos)
    hits = 0
    for start in range(0, n, batch):
        chunk = prompts[start : start + batch]
        out = generate(model, [p for p, _, _ in chunk], list(range(start, start + len(chunk))), guidance, steps,
                       scheduler=scheduler, rescale=rescale)
        judged = _oracle().classify(out.images)
        hits += sum(j == (c, s) for j, (_, c, s) in zip(judged, chunk))
    return hits / n
