"""guidance_latency: single-evaluation distilled sampling vs two-evaluation CFG, side by side.

ratio = distilled / teacher latency, whole images (text encoding + denoising + decoding) at
equal steps on the toy, interleaved. limit = the best that ratio can be on this machine, from
the same run's component timings, with W0's own batch-1 time (LoRA at no cost):
    (text(1 prompt) + steps * unet(batch 1) + decode) / (text(2 prompts) + steps * unet(batch 2) + decode)
limit_with_lora uses the student's measured batch-1 time instead (its LoRA included). The toy
figures use the serving default (merged LoRA on CPU).
ratio_sd15 = the same ratio for the denoising loop of a random-weight SD-1.5-shaped UNet at a
32x32 latent and 4 steps, the student carrying a rank-64 LoRA (random weights) and the w
projection (text encoder and VAE are not part of that figure).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bench.common import image_limit, image_parts, interleaved_medians, sd15_with_adapter, toy_with_guidance_adapter
from distillery.model import Conditioning
from distillery.sampling.guidance import guidance_embedding
from distillery.sampling.pipeline import Denoising, generate, unet_step
from distillery.sampling.plan import SamplingPlan
from distillery.sampling.sampler import GuidedSampler, initial_noise, make_scheduler

PROMPT = "a small blue triangle on a yellow background"


def _count_rows(model, fn) -> int:
    rows = []
    hook = model.unet.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    fn()
    hook.remove()
    return sum(rows)


def single_eval_vs_cfg(model, registry, adapter, w: float, steps: int, rounds: int) -> dict:
    """Whole images at equal steps: the guidance adapter's one evaluation a step against CFG's two, with the
    limits from the same run's components."""
    def teacher():
        return generate(model, [PROMPT], [0], w, steps, registry=registry)

    def distilled():
        return generate(model, [PROMPT], [0], w, steps, adapters=[(adapter, 1.0)], registry=registry)

    whole = interleaved_medians({"teacher": teacher, "distilled": distilled}, rounds)

    parts = image_parts(model, registry, adapter, PROMPT, w, rounds * 3)

    def limit_with(b1: float) -> float:
        return image_limit(parts, b1, steps, steps)

    limit = limit_with(parts["unet_b1_base"])  # a single evaluation as cheap as W0's: LoRA for free
    return {
        "ratio": whole["distilled"] / whole["teacher"],
        "limit": limit,
        "ratio_over_limit": whole["distilled"] / whole["teacher"] / limit,
        "teacher_ms": whole["teacher"] * 1e3, "distilled_ms": whole["distilled"] * 1e3,
        "limit_with_lora": limit_with(parts["unet_b1_student"]),  # the student's measured b1, its LoRA included
        "unet_b1_base_ms": parts["unet_b1_base"] * 1e3, "unet_b1_student_ms": parts["unet_b1_student"] * 1e3,
        "unet_b2_ms": parts["unet_b2_teacher"] * 1e3,
        "unet_calls_distilled": _count_rows(model, distilled), "unet_calls_teacher": _count_rows(model, teacher),
        "steps": steps,
    }


def _toy(quick: bool) -> dict:
    model, registry, adapter = toy_with_guidance_adapter()
    steps, rounds = (3, 2) if quick else (25, 9)
    return single_eval_vs_cfg(model, registry, adapter, 2.0, steps, rounds)


def _sd15(quick: bool) -> dict:
    """Denoising loops on an SD-1.5-shaped UNet (quick: a narrow variant of the same layout), with the
    student's LoRA merged (the CPU default) and per-row (suffix _unmerged; the CUDA default)."""
    with tempfile.TemporaryDirectory() as tmp:
        model, registry, adapter = sd15_with_adapter(Path(tmp), quick, kind="guidance", rank=64)
        latent = 8 if quick else 32
        cond = torch.randn(1, 77, model.unet.config.cross_attention_dim)
        uncond = torch.randn_like(cond)

        def run_loop(adapters: tuple, text_uncond) -> None:
            noise = initial_noise(0, (4, latent, latent), "cpu", torch.float32)
            sampler = GuidedSampler(make_scheduler("ddim", model.scheduler_config), noise, 4, 2.0, Conditioning(cond),
                                    None if text_uncond is None else Conditioning(text_uncond))
            plan = SamplingPlan(2.0, 4, "ddim", single_eval=text_uncond is None, width=latent * 8, height=latent * 8)
            request = Denoising(plan, sampler, adapters)
            while not sampler.done:
                unet_step(model, registry, [request])

        out = {}
        x1, x2 = torch.randn(1, 4, latent, latent), torch.randn(2, 4, latent, latent)
        t = torch.tensor(500)

        def base_call(x, text):
            with torch.no_grad():
                model.unet(x, t, encoder_hidden_states=text, timestep_cond=guidance_embedding(torch.zeros(len(x))))

        parts = interleaved_medians({"b1": lambda: base_call(x1, cond), "b2": lambda: base_call(x2, torch.cat([cond, uncond]))},
                                    1 if quick else 3)
        out["limit_sd15"] = parts["b1"] / parts["b2"]  # denoising only: W0 batch 1 over W0 batch 2
        for path, budget in (("unmerged", 0), ("merged", 8 << 30)):
            registry.merged_budget_bytes = budget
            whole = interleaved_medians({"teacher": lambda: run_loop((), uncond),
                                         "distilled": lambda: run_loop(((adapter, 1.0),), None)}, 1 if quick else 3)
            suffix = "" if path == "merged" else "_unmerged"
            out[f"ratio_sd15{suffix}"] = whole["distilled"] / whole["teacher"]
            out[f"distilled_sd15{suffix}_ms"] = whole["distilled"] * 1e3
            out[f"teacher_sd15{suffix}_ms"] = whole["teacher"] * 1e3
    return out


def run(quick: bool = False) -> dict:
    return {**_toy(quick), **_sd15(quick)}
