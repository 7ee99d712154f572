"""gpu_single_eval: a whole image with a guidance-distilled adapter (one UNet row per step) vs CFG (two rows
per step), same steps (GPU suite; bench/gpu_common.py).

SD-1.5-shaped model, random weights, fp16, 512x512, DDIM, 25 steps (quick: 4), w = 2; the student is a
rank-64 guidance adapter (LoRA + w projection) run as the server runs it (per-row LoRA, the fused kernel on
CUDA). Whole images through `generate` (text encoding + denoising + decoding to PIL), wall clock between
synchronizations, interleaved, medians.
  single_eval_over_cfg  single-eval image time / CFG image time (target: <= 0.55)
  limit                 the best that ratio can be on this device, from the same run's component times
                        (W0 alone, LoRA free): (text(1) + steps * unet(b1) + decode) /
                        (text(2) + steps * unet(b2) + decode)
  over_limit            single_eval_over_cfg / limit: what distillery's own costs add
  limit_with_lora       the same with the student's measured batch-1 call (its LoRA included)
  unet_b2_over_b1       the CFG call over the single-eval call, W0 alone (2 would make the ratio 0.5)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bench.gpu_common import PROMPT, W, base_model, interleaved_medians, plan_for, random_adapter, setup
from distillery.adapters import AdapterRegistry
from distillery.sampling.guidance import guidance_embedding
from distillery.sampling.pipeline import generate

NEEDS_CUDA = True
CPU_SMOKE = True


def _parts(plan, model, registry, student, rounds: int) -> dict[str, float]:
    """Median seconds of an image's components as the sampler runs them."""
    shape = model.latent_shape(model.default_size, model.default_size)
    dev = {"device": plan.device, "dtype": plan.dtype}
    x1, x2 = torch.randn(1, *shape, **dev), torch.randn(2, *shape, **dev)
    text1, text2 = model.encode_prompts([PROMPT]), model.encode_prompts([PROMPT, ""])
    t = torch.tensor([500], device=plan.device)

    def unet_call(x, text, row_sets):
        w_emb = guidance_embedding(torch.full((len(x),), W)).to(**dev)
        with torch.no_grad(), registry.active(row_sets):
            model.unet(x, t.expand(len(x)), **text.unet_kwargs(), timestep_cond=w_emb)

    return interleaved_medians(plan, {
        "unet_b1": lambda: unet_call(x1, text1, [()]),
        "unet_b1_student": lambda: unet_call(x1, text1, [((student, 1.0),)]),
        "unet_b2": lambda: unet_call(x2, text2, [(), ()]),
        "text_1": lambda: model.encode_prompts([PROMPT]), "text_2": lambda: model.encode_prompts([PROMPT, ""]),
        "decode": lambda: model.decode(x1),
    }, rounds, warmup=2, events=False)


def run(quick: bool = False, device: str = "cuda") -> dict:
    plan = plan_for(device, quick)
    model = base_model(plan)
    with tempfile.TemporaryDirectory() as tmp:
        registry = AdapterRegistry(model)
        student = registry.load("guidance", random_adapter(plan, Path(tmp) / "guidance", model, kind="guidance"))
    steps = plan.pick(25, 4, 2)

    def image(adapters):
        return lambda: generate(model, [PROMPT], [0], W, steps, scheduler="ddim", adapters=adapters, registry=registry)

    single, cfg = image(((student, 1.0),)), image(())
    assert single().unet_evaluations == steps and cfg().unet_evaluations == 2 * steps  # the modes are what they say
    whole = interleaved_medians(plan, {"single_eval": single, "cfg": cfg}, plan.pick(3, 1, 1), warmup=0,
                                events=False)  # warmed up by the check above
    parts = _parts(plan, model, registry, student, plan.pick(10, 3, 1))

    def limit_with(b1: float) -> float:
        teacher = parts["text_2"] + steps * parts["unet_b2"] + parts["decode"]
        return (parts["text_1"] + steps * b1 + parts["decode"]) / teacher

    ratio, limit = whole["single_eval"] / whole["cfg"], limit_with(parts["unet_b1"])
    return {
        "single_eval_over_cfg": ratio, "limit": limit, "over_limit": ratio / limit,
        "limit_with_lora": limit_with(parts["unet_b1_student"]),
        "unet_b2_over_b1": parts["unet_b2"] / parts["unet_b1"],
        "single_eval_ms": whole["single_eval"] * 1e3, "cfg_ms": whole["cfg"] * 1e3,
        **{f"{k}_ms": v * 1e3 for k, v in parts.items()},
        "steps": steps, "rank": plan.rank, "setup": setup(plan),
    }
