"""guidance_quality: oracle alignment of the guidance-distilled sampler vs the CFG teacher.

Same prompts and seeds, 25 DDIM steps, w in {0, 1, 2, 3}; gaps are teacher minus distilled.
"""

from __future__ import annotations

from bench.common import toy_with_guidance_adapter
from bench.references import eval_images
from distillery.distill.evaluation.alignment import alignment_of, psnr
from distillery.distill.toy.data import HELDOUT_COMBOS


def run(quick: bool = False) -> dict:
    model, registry, adapter = toy_with_guidance_adapter()
    n, steps, weights = (8, 3, (0, 2)) if quick else (200, 25, (0, 1, 2, 3))
    figures = {}
    for w in weights:
        teacher_images, prompts = eval_images(model, n, guidance=float(w), steps=steps)
        distilled_images, _ = eval_images(model, n, guidance=float(w), steps=steps, adapters=[(adapter, 1.0)],
                                          registry=registry)
        figures[f"alignment_teacher_w{w}"] = alignment_of(teacher_images, prompts)
        figures[f"alignment_distilled_w{w}"] = alignment_of(distilled_images, prompts)
        figures[f"alignment_gap_w{w}"] = figures[f"alignment_teacher_w{w}"] - figures[f"alignment_distilled_w{w}"]
        if w == 2:
            figures["psnr_w2"] = psnr(distilled_images, teacher_images)
    for who, adapters in (("teacher", ()), ("distilled", [(adapter, 1.0)])):
        images, prompts = eval_images(model, n, guidance=2.0, steps=steps, combos=HELDOUT_COMBOS, adapters=adapters,
                                      registry=registry)
        figures[f"heldout_alignment_{who}_w2"] = alignment_of(images, prompts)
    figures["heldout_alignment_gap_w2"] = figures["heldout_alignment_teacher_w2"] - figures["heldout_alignment_distilled_w2"]
    figures["prompts"] = n
    return figures
