"""steps_latency: a 4-step consistency-distilled image vs a 25-step CFG teacher image, side by side.

ratio = distilled / teacher latency, whole images (text encoding + denoising + decoding) on the
toy, interleaved in one run. limit = the best that ratio can be on this machine, from the same
run's component timings (W0's own calls: LoRA and the w projection at no cost):
    (text(1 prompt) + 4 * unet(batch 1) + decode) / (text(2 prompts) + 25 * unet(batch 2) + decode)
limit_with_lora uses the student's measured batch-1 call instead.
"""

from __future__ import annotations

from bench.common import CONSISTENCY_ADAPTER, image_limit, image_parts, interleaved_medians, toy_with_adapters
from distillery.sampling.pipeline import generate

PROMPT = "a small blue triangle on a yellow background"


def few_steps_vs_cfg(model, registry, adapter, rounds: int, teacher_steps: int = 25) -> dict:
    """Whole images: the consistency adapter at its recommended steps against the CFG teacher at
    `teacher_steps`, at the model's default w, with the limits from the same run's components."""
    student_steps = adapter.meta.recommended_steps
    w = float(model.defaults.get("guidance", 1.0))
    whole = interleaved_medians({
        "teacher": lambda: generate(model, [PROMPT], [0], w, teacher_steps, registry=registry),
        "distilled": lambda: generate(model, [PROMPT], [0], w, student_steps, adapters=[(adapter, 1.0)],
                                      registry=registry),
    }, rounds)

    parts = image_parts(model, registry, adapter, PROMPT, w, rounds * 3)

    def limit_with(b1: float) -> float:
        return image_limit(parts, b1, student_steps, teacher_steps)

    ratio, limit = whole["distilled"] / whole["teacher"], limit_with(parts["unet_b1_base"])
    return {
        "ratio": ratio, "limit": limit, "ratio_over_limit": ratio / limit,
        "limit_with_lora": limit_with(parts["unet_b1_student"]),
        "teacher_ms": whole["teacher"] * 1e3, "distilled_ms": whole["distilled"] * 1e3,
        **{f"{k}_ms": v * 1e3 for k, v in parts.items()},
        "student_steps": student_steps, "teacher_steps": teacher_steps,
    }


def run(quick: bool = False) -> dict:
    model, registry, adapters = toy_with_adapters([CONSISTENCY_ADAPTER])
    return few_steps_vs_cfg(model, registry, adapters[CONSISTENCY_ADAPTER], 2 if quick else 15)
