"""Text -> image for a batch of prompts: encode, sample, decode, with timings.

The one place that strings model and sampler together; the engine, the CLI and the
evaluation all call `generate`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from server.model import DiffusionModel
from server.sampler import initial_noise, make_scheduler, sample_cfg


@dataclass
class Generated:
    images: list[Image.Image]
    unet_evaluations: int  # UNet rows evaluated per image (2 per step with CFG)
    timings_ms: dict[str, float] = field(default_factory=dict)


def generate(model: DiffusionModel, prompts: list[str], seeds: list[int], guidance: float | list[float],
             steps: int, scheduler: str = "ddim", rescale: float = 0.0,
             height: int | None = None, width: int | None = None) -> Generated:
    height, width = height or model.default_size, width or model.default_size
    n = len(prompts)
    w = torch.tensor(guidance if isinstance(guidance, list) else [guidance] * n, dtype=torch.float32)
    timings = {}
    t0 = time.perf_counter()
    text = model.encode_prompts(list(prompts) + [""])  # (B + 1, T, D): the empty prompt is shared
    cond, uncond = text[:n], text[n:].expand(n, -1, -1)
    t1 = time.perf_counter()
    noise = initial_noise(seeds, model.latent_shape(height, width), model.device, model.dtype)

    def denoise(x, t, emb):
        return model.unet(x, t, encoder_hidden_states=emb).sample

    latents = sample_cfg(denoise, make_scheduler(scheduler, model.scheduler_config), cond, uncond, w.to(model.device),
                         noise, steps, rescale)
    t2 = time.perf_counter()
    images = model.decode(latents)
    t3 = time.perf_counter()
    timings.update(text_encode=(t1 - t0) * 1e3, denoise=(t2 - t1) * 1e3, decode=(t3 - t2) * 1e3)
    return Generated(images, unet_evaluations=2 * steps, timings_ms=timings)
