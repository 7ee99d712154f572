"""steps_quality: what few steps cost in quality, with and without step distillation.

Oracle alignment and FID (the oracle's features, distillery/distill/evaluation/fid.py) at the model's
default w, the same prompts and seeds for every sampler: the CFG teacher at 25 DDIM steps; the
teacher with plain DDIM at 1, 2, 4, 8 steps (no distillation); the consistency adapter (LCM
scheduler) at 1, 2, 4, 8; each progressive adapter at the step count it was trained for.
gap_* = align_teacher_25 - align_*; fid_ratio_* = fid_* / fid_teacher_25; fid_real = fresh
renders against the reference renders (the floor). w control: alignment at w = 0..3 of the
consistency adapter at 4 steps beside the teacher's at 25 (w_gap_lcm_max = the largest
absolute difference). Held-out colour-shape pairs at 4 steps.
"""

from __future__ import annotations

from bench.common import CONSISTENCY_ADAPTER, progressive_adapters, toy_with_adapters
from bench.references import eval_images, fid_reference
from distillery.distill.evaluation.alignment import alignment_of
from distillery.distill.toy.data import HELDOUT_COMBOS, TRAIN_COMBOS

STEP_COUNTS = (1, 2, 4, 8)
W_CONTROL = (0, 1, 2, 3)


def run(quick: bool = False) -> dict:
    progressive = progressive_adapters()
    model, registry, adapters = toy_with_adapters([CONSISTENCY_ADAPTER, *progressive.values()])
    lcm = adapters[CONSISTENCY_ADAPTER]
    n, n_small = (32, 8) if quick else (1000, 200)
    w = float(model.defaults.get("guidance", 1.0))
    reference, floor = fid_reference(n)  # shared with prune (bench/references.py)
    figures = {"images": n, "images_w_control": n_small, "guidance": w, "fid_real": floor}

    generated = {}  # eval_images' prompts and seeds are fixed: the first k of a larger set are the k-image set

    def measure(key: str, steps: int, adapter=None, guidance: float = w, count: int = n, combos=TRAIN_COMBOS,
                fid: bool = True) -> float:
        same = (steps, adapter.name if adapter else None, guidance, combos)
        if same not in generated or len(generated[same][0]) < count:
            generated[same] = eval_images(model, count, guidance=guidance, steps=steps, combos=combos, batch=250,
                                          adapters=[(adapter, 1.0)] if adapter else (), registry=registry)
        images, prompts = (x[:count] for x in generated[same])
        figures[f"align_{key}"] = alignment_of(images, prompts)
        if fid:
            figures[f"fid_{key}"] = reference.fid(images)
        return figures[f"align_{key}"]

    teacher = measure("teacher_25", 25)
    samplers = [(f"ddim_{k}", k, None) for k in STEP_COUNTS] + [(f"lcm_{k}", k, lcm) for k in STEP_COUNTS]
    samplers += [(f"progressive_{k}", k, adapters[name]) for k, name in sorted(progressive.items())]
    for key, steps, adapter in samplers:
        figures[f"gap_{key}"] = teacher - measure(key, steps, adapter)
        figures[f"fid_ratio_{key}"] = figures[f"fid_{key}"] / figures["fid_teacher_25"]

    gaps = []
    for wv in W_CONTROL:
        gaps.append(abs(measure(f"w{wv}_teacher_25", 25, guidance=float(wv), count=n_small, fid=False)
                        - measure(f"w{wv}_lcm_4", 4, lcm, guidance=float(wv), count=n_small, fid=False)))
    figures["w_gap_lcm_max"] = max(gaps)

    held_out = measure("heldout_teacher_25", 25, count=n_small, combos=HELDOUT_COMBOS, fid=False)
    for key, adapter in [("lcm_4", lcm)] + ([("progressive_4", adapters[progressive[4]])] if 4 in progressive else []):
        figures[f"heldout_gap_{key}"] = held_out - measure(f"heldout_{key}", 4, adapter, count=n_small,
                                                           combos=HELDOUT_COMBOS, fid=False)
    return figures
