"""gpu_vs_diffusers: the same image through stock diffusers and through distillery (GPU suite;
bench/gpu_common.py).

One set of components (SD-1.5-shaped, random weights, fp16, 512x512; the VAE, text encoder and tokenizer
are the same objects in both, the UNets hold the same weights), one rank-64 style LoRA, DDIM 25 steps
(quick: 4), CFG at w = 2 (diffusers' guidance_scale 3), the same initial latents, PIL images out of both:
  diffusers   StableDiffusionPipeline from those components, `load_lora_weights` + `set_adapters` (peft,
              unfused), `pipe(prompt, latents=...)`
  distillery  DiffusionModel + AdapterRegistry + `generate` (the serving default: per-row LoRA through the
              fused Triton kernel on CUDA)
Wall clock per image between synchronizations, interleaved, medians.
  vs_diffusers              distillery / diffusers, per image (target: < 1)
  single_eval_vs_diffusers  distillery with a rank-64 guidance-distilled adapter as well (one UNet row per
                            step) / the same diffusers CFG image: what a user of the distilled adapter gets
  image_max_diff, image_mean_diff: |distillery - diffusers| over the two images' pixels (0-255): the same
                            image, up to rounding (fp16 on the GPU)
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
from diffusers import DDIMScheduler, StableDiffusionPipeline

from bench.gpu_common import (
    PROMPT,
    W,
    base_model,
    check_peft_adapter,
    interleaved_medians,
    plan_for,
    random_adapter,
    setup,
    stock_unet,
    to_plan,
)
from distillery.adapters import AdapterRegistry
from distillery.sampling.pipeline import generate
from distillery.sampling.sampler import initial_noise

NEEDS_CUDA = True
CPU_SMOKE = True
SEED = 0


def run(quick: bool = False, device: str = "cuda") -> dict:
    plan = plan_for(device, quick)
    model = base_model(plan)
    steps, size = plan.pick(25, 4, 2), model.default_size
    with warnings.catch_warnings():  # the toy's scheduler config (CPU smoke) has steps_offset 0: diffusers' FutureWarning
        warnings.simplefilter("ignore", FutureWarning)
        pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                       unet=stock_unet(model),
                                       scheduler=DDIMScheduler.from_config(model.scheduler_config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        style_folder = random_adapter(plan, Path(tmp) / "style", model)
        pipe.load_lora_weights(style_folder, adapter_name="style")
        pipe.set_adapters(["style"], [1.0])
        to_plan(plan, pipe.unet)  # the LoRA weights in the UNet's dtype, as distillery's
        check_peft_adapter(pipe.unet, "style", style_folder)  # every layer, the file's weights: the same image
        registry = AdapterRegistry(model)
        style = registry.load("style", style_folder)
        guidance = registry.load("guidance", random_adapter(plan, Path(tmp) / "guidance", model, kind="guidance", seed=1))
    latents = initial_noise(SEED, model.latent_shape(size, size), plan.device, plan.dtype)  # distillery's, for both

    def diffusers_image():
        return pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=1 + W,
                    latents=latents.clone(), output_type="pil").images[0]

    def distillery_image(adapters):
        return generate(model, [PROMPT], [SEED], W, steps, scheduler="ddim", adapters=adapters,
                        registry=registry).images[0]

    ours = np.asarray(distillery_image(((style, 1.0),)), dtype=np.int16)
    theirs = np.asarray(diffusers_image(), dtype=np.int16)
    times = interleaved_medians(plan, {
        "diffusers": diffusers_image,
        "distillery": lambda: distillery_image(((style, 1.0),)),
        "distillery_single_eval": lambda: distillery_image(((guidance, 1.0), (style, 1.0))),
    }, plan.pick(3, 1, 1), events=False)
    return {
        "vs_diffusers": times["distillery"] / times["diffusers"],
        "single_eval_vs_diffusers": times["distillery_single_eval"] / times["diffusers"],
        "image_max_diff": float(np.abs(ours - theirs).max()), "image_mean_diff": float(np.abs(ours - theirs).mean()),
        **{f"{k}_ms": v * 1e3 for k, v in times.items()},
        "steps": steps, "rank": plan.rank, "setup": setup(plan),
    }
