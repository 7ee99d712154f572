"""steps_latency: a 4-step consistency-distilled image vs a 25-step CFG teacher image, side by side.

ratio = distilled / teacher latency, whole images (text encoding + denoising + decoding) on the
toy, interleaved in one run. limit = the best that ratio can be on this machine, from the same
run's component timings (W0's own calls: LoRA and the w projection at no cost):
    (text(1 prompt) + 4 * unet(batch 1) + decode) / (text(2 prompts) + 25 * unet(batch 2) + decode)
limit_with_lora uses the student's measured batch-1 call instead.
"""

from __future__ import annotations

import torch

from bench.common import CONSISTENCY_ADAPTER, interleaved_medians, toy_with_adapters
from distillery.sampling.guidance import guidance_embedding
from distillery.sampling.pipeline import generate

PROMPT = "a small blue triangle on a yellow background"


def run(quick: bool = False) -> dict:
    model, registry, adapters = toy_with_adapters([CONSISTENCY_ADAPTER])
    adapter = adapters[CONSISTENCY_ADAPTER]
    student_steps, teacher_steps = adapter.meta.recommended_steps, 25
    rounds = 2 if quick else 15
    w = float(model.defaults.get("guidance", 1.0))
    whole = interleaved_medians({
        "teacher": lambda: generate(model, [PROMPT], [0], w, teacher_steps, registry=registry),
        "distilled": lambda: generate(model, [PROMPT], [0], w, student_steps, adapters=[(adapter, 1.0)],
                                      registry=registry),
    }, rounds)

    shape = model.latent_shape(model.default_size, model.default_size)
    x1, x2 = torch.randn(1, *shape), torch.randn(2, *shape)
    text1, text2 = model.encode_prompts([PROMPT]), model.encode_prompts([PROMPT, ""])
    t = torch.tensor(500)

    def unet_call(x, text, row_sets):
        with torch.no_grad(), registry.active(row_sets):
            model.unet(x, t, encoder_hidden_states=text, timestep_cond=guidance_embedding(torch.full((len(x),), w)))

    parts = interleaved_medians({
        "unet_b1_base": lambda: unet_call(x1, text1, [()]),
        "unet_b1_student": lambda: unet_call(x1, text1, [((adapter, 1.0),)]),
        "unet_b2_teacher": lambda: unet_call(x2, text2, [(), ()]),
        "text_1": lambda: model.encode_prompts([PROMPT]), "text_2": lambda: model.encode_prompts([PROMPT, ""]),
        "decode": lambda: model.decode(x1),
    }, rounds * 3)

    def limit_with(b1: float) -> float:
        teacher = parts["text_2"] + teacher_steps * parts["unet_b2_teacher"] + parts["decode"]
        return (parts["text_1"] + student_steps * b1 + parts["decode"]) / teacher

    ratio, limit = whole["distilled"] / whole["teacher"], limit_with(parts["unet_b1_base"])
    return {
        "ratio": ratio, "limit": limit, "ratio_over_limit": ratio / limit,
        "limit_with_lora": limit_with(parts["unet_b1_student"]),
        "teacher_ms": whole["teacher"] * 1e3, "distilled_ms": whole["distilled"] * 1e3,
        **{f"{k}_ms": v * 1e3 for k, v in parts.items()},
        "student_steps": student_steps, "teacher_steps": teacher_steps,
    }
