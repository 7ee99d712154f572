"""style: the stripes style LoRA composed with each distilled adapter, at the distilled adapter's steps.

style_strength (distillery/distill/methods/style.py): 0 = plain images (the CFG teacher at 25 steps),
1 = the style alone at 25-step CFG. For each distilled adapter (guidance at 25 steps, consistency
at 4, each progressive adapter at its steps), composed with the style at weight 1:
style_strength_<who> and style_alignment_gap_<who> = alignment of the style alone at 25-step
CFG minus alignment of the composition; the distilled adapter alone for reference.
"""

from __future__ import annotations

from bench.common import CONSISTENCY_ADAPTER, GUIDANCE_ADAPTER, STYLE_ADAPTER, progressive_adapters, toy_with_adapters
from bench.references import eval_images
from distillery.distill.evaluation.alignment import alignment_of
from distillery.distill.methods.style import stripe_score, style_strength


def run(quick: bool = False) -> dict:
    progressive = progressive_adapters()
    model, registry, adapters = toy_with_adapters([GUIDANCE_ADAPTER, CONSISTENCY_ADAPTER, STYLE_ADAPTER,
                                                   *progressive.values()])
    style = adapters[STYLE_ADAPTER]
    n = 12 if quick else 300
    w = float(model.defaults.get("guidance", 1.0))

    def images(steps: int, chosen: list):
        return eval_images(model, n, guidance=w, steps=steps, adapters=chosen, registry=registry, batch=150)

    plain, prompts = images(25, [])
    styled, _ = images(25, [(style, 1.0)])
    plain_score, style_score = stripe_score(plain), stripe_score(styled)
    figures = {"images": n, "guidance": w, "stripe_score_plain": plain_score, "stripe_score_style": style_score,
               "alignment_plain_25": alignment_of(plain, prompts), "alignment_style_25": alignment_of(styled, prompts)}
    distilled = [("guidance_25", GUIDANCE_ADAPTER, 25), (f"lcm_{adapters[CONSISTENCY_ADAPTER].meta.recommended_steps}",
                                                        CONSISTENCY_ADAPTER, adapters[CONSISTENCY_ADAPTER].meta.recommended_steps)]
    distilled += [(f"progressive_{k}", name, k) for k, name in sorted(progressive.items())]
    for who, name, steps in distilled:
        alone, _ = images(steps, [(adapters[name], 1.0)])
        composed, _ = images(steps, [(adapters[name], 1.0), (style, 1.0)])
        figures[f"style_strength_{who}_alone"] = style_strength(alone, plain_score, style_score)
        figures[f"style_strength_{who}"] = style_strength(composed, plain_score, style_score)
        figures[f"alignment_{who}"] = alignment_of(composed, prompts)
        figures[f"style_alignment_gap_{who}"] = figures["alignment_style_25"] - figures[f"alignment_{who}"]
    return figures
