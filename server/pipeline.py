"""Text -> image for a batch of prompts: encode, sample, decode, with timings.

The one place that strings model and sampler together; the engine, the CLI and the
evaluation all call `generate`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from server.guidance import guidance_embedding
from server.model import DiffusionModel
from server.registry import LoadedAdapter, activate, guidance_adapter
from server.sampler import initial_noise, make_scheduler, sample_cfg, sample_single


@dataclass
class Generated:
    images: list[Image.Image]
    unet_evaluations: int  # UNet rows evaluated per image: 2 per step with CFG, 1 single-eval
    mode: str  # "cfg" or "single-eval"
    timings_ms: dict[str, float] = field(default_factory=dict)


def generate(model: DiffusionModel, prompts: list[str], seeds: list[int], guidance: float | list[float],
             steps: int, scheduler: str = "ddim", rescale: float = 0.0,
             height: int | None = None, width: int | None = None,
             adapters: list[tuple[LoadedAdapter, float]] = ()) -> Generated:
    """With a guidance-distilled adapter among `adapters`: one w-conditioned UNet call per step; otherwise CFG (two)."""
    height, width = height or model.default_size, width or model.default_size
    n = len(prompts)
    w = torch.tensor(guidance if isinstance(guidance, list) else [guidance] * n, dtype=torch.float32)
    timings = {}
    single = guidance_adapter(list(adapters)) is not None
    unet = model.unet
    activate(unet, list(adapters))
    t0 = time.perf_counter()
    text = model.encode_prompts(list(prompts) if single else list(prompts) + [""])  # (B [+ 1], T, D)
    cond = text[:n]
    t1 = time.perf_counter()
    noise = initial_noise(seeds, model.latent_shape(height, width), model.device, model.dtype)
    sched = make_scheduler(scheduler, model.scheduler_config)
    w = w.to(model.device)
    if single:
        def denoise_w(x, t, emb, w_rows):
            return unet(x, t, encoder_hidden_states=emb, timestep_cond=guidance_embedding(w_rows).to(x.dtype)).sample

        latents = sample_single(denoise_w, sched, cond, w, noise, steps)
    else:
        def denoise(x, t, emb):
            return unet(x, t, encoder_hidden_states=emb).sample

        uncond = text[n:].expand(n, -1, -1)  # the empty prompt, shared by every row
        latents = sample_cfg(denoise, sched, cond, uncond, w, noise, steps, rescale)
    t2 = time.perf_counter()
    images = model.decode(latents)
    t3 = time.perf_counter()
    timings.update(text_encode=(t1 - t0) * 1e3, denoise=(t2 - t1) * 1e3, decode=(t3 - t2) * 1e3)
    return Generated(images, unet_evaluations=steps if single else 2 * steps, mode="single-eval" if single else "cfg",
                     timings_ms=timings)
