"""xl_quality: the SDXL-family toy (models/toy-xl) judged as the toy is: oracle alignment and FID (the
oracle's features) on the same prompts and seeds.

- teacher: CFG at 25 DDIM steps for w in 0, 1, 2, 3, 5 (toy_quality's sweep); the best w becomes toy-xl's
  default guidance (distillery.json). best_alignment = its alignment.
- guidance adapter (guidance-toy-xl), 25 steps, one evaluation a step: alignment_gap_w1/_w2/_w3 = teacher
  minus distilled at that w.
- consistency adapter (lcm-toy-xl, LCM scheduler) at 4 and 2 steps against the 25-step teacher at the default
  w: gap_lcm_4, gap_lcm_2, fid_ratio_lcm_4; w control: w_gap_lcm_max = the largest |teacher 25 - lcm 4|
  alignment difference over w in 0..3.
- style (stripes-toy-xl) composed with the consistency adapter at 4 steps: style_strength_lcm_4
  (0 = plain 25-step CFG images, 1 = the style alone at 25-step CFG).
An adapter not shipped for toy-xl yet has no figures; the run names it.
"""

from __future__ import annotations

from bench.references import eval_images, fid_reference
from bench.toy_quality import teacher_sweep
from distillery.adapters import AdapterRegistry
from distillery.distill.evaluation.alignment import alignment_of
from distillery.distill.methods.style import stripe_score, style_strength
from distillery.model import DiffusionModel
from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_XL_MODEL

GUIDANCE, CONSISTENCY, STYLE = "guidance-toy-xl", "lcm-toy-xl", "stripes-toy-xl"
W_CONTROL = (0, 1, 2, 3)


def run(quick: bool = False) -> dict:
    figures = {f"teacher_{k}": v for k, v in teacher_sweep(EMBEDDED_XL_MODEL, quick, "xl_quality").items()}
    model = DiffusionModel.from_pretrained(EMBEDDED_XL_MODEL)  # after the sweep: its default w is the best one
    registry = AdapterRegistry(model)
    shipped = {name: registry.load(name, EMBEDDED_ADAPTERS / name) for name in (GUIDANCE, CONSISTENCY, STYLE)
               if (EMBEDDED_ADAPTERS / name).is_dir()}
    missing = [name for name in (GUIDANCE, CONSISTENCY, STYLE) if name not in shipped]
    if missing:
        print(f"xl_quality: not shipped for toy-xl yet, so not measured: {', '.join(missing)}")
    n, n_small, steps = (32, 8, 3) if quick else (1000, 200, 25)
    w = float(model.defaults.get("guidance", 1.0))
    best = figures["teacher_best_w"]
    figures.update({"best_alignment": figures[f"teacher_alignment_w{best}"], "guidance": w})

    def judged(count: int, guidance: float, k: int, adapters=()):
        return eval_images(model, count, guidance=guidance, steps=k, adapters=adapters, registry=registry, batch=250)

    if GUIDANCE in shipped:
        for wv in (1, 2, 3):
            teacher = alignment_of(*judged(n_small, float(wv), steps))
            distilled = alignment_of(*judged(n_small, float(wv), steps, [(shipped[GUIDANCE], 1.0)]))
            figures[f"alignment_gap_w{wv}"] = teacher - distilled
    if CONSISTENCY in shipped:
        lcm = [(shipped[CONSISTENCY], 1.0)]
        reference, floor = fid_reference(n)
        teacher_images, prompts = judged(n, w, steps)
        figures.update({"images": n, "align_teacher_25": alignment_of(teacher_images, prompts), "fid_real": floor,
                        "fid_teacher_25": reference.fid(teacher_images)})
        for k in (4, 2):
            images, _ = judged(n, w, k, lcm)
            figures[f"gap_lcm_{k}"] = figures["align_teacher_25"] - alignment_of(images, prompts)
            figures[f"fid_ratio_lcm_{k}"] = reference.fid(images) / figures["fid_teacher_25"]
        figures["w_gap_lcm_max"] = max(abs(alignment_of(*judged(n_small, float(wv), steps))
                                           - alignment_of(*judged(n_small, float(wv), 4, lcm))) for wv in W_CONTROL)
        if STYLE in shipped:
            plain, _ = judged(n_small, w, steps)
            styled, _ = judged(n_small, w, steps, [(shipped[STYLE], 1.0)])
            composed, _ = judged(n_small, w, 4, lcm + [(shipped[STYLE], 1.0)])
            figures["style_strength_lcm_4"] = style_strength(composed, stripe_score(plain), stripe_score(styled))
    return figures
