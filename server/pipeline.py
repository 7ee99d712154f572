"""Text -> image: requests become samplers, samplers share UNet calls, latents become PNGs.

`unet_step` is the one place that turns the rows of many samplers (any timesteps, w and
adapter sets) into ONE UNet call; the engine calls it per step for whatever is in flight,
and `generate` (CLI, evaluation, benchmarks) runs a fixed list of prompts through it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from server.guidance import guidance_embedding
from server.model import DiffusionModel
from server.registry import AdapterRegistry, AdapterSet, guidance_adapter, set_key
from server.sampler import GuidedSampler, initial_noise, make_scheduler


@dataclass
class Request:
    """One image in flight: its sampler, its adapters, its clocks."""

    sampler: GuidedSampler
    adapters: AdapterSet
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return "cfg" if self.sampler.cfg else "single-eval"

    @property
    def unet_evaluations(self) -> int:
        return self.sampler.n_rows * len(self.sampler.timesteps)


def start_request(model: DiffusionModel, prompt: str, seed: int, guidance: float, steps: int,
                  scheduler: str = "ddim", adapters: AdapterSet = (), rescale: float = 0.0,
                  height: int | None = None, width: int | None = None, negative_prompt: str = "") -> Request:
    """Encode the prompt (alone: the result never depends on other requests) and make the sampler.

    A guidance-distilled adapter in `adapters` -> single-eval sampling; otherwise CFG.
    """
    single = guidance_adapter(adapters) is not None
    t0 = time.perf_counter()
    text = model.encode_prompts([prompt] if single else [prompt, negative_prompt])  # (1 or 2, T, D)
    t1 = time.perf_counter()
    shape = model.latent_shape(height or model.default_size, width or model.default_size)
    noise = initial_noise(seed, shape, model.device, model.dtype)
    sampler = GuidedSampler(make_scheduler(scheduler, model.scheduler_config), noise, steps, guidance,
                            cond=text[:1], uncond=None if single else text[1:], rescale=rescale)
    return Request(sampler, tuple(adapters), {"text_encode": (t1 - t0) * 1e3})


@torch.no_grad()
def unet_step(model: DiffusionModel, registry: AdapterRegistry, requests: list[Request]) -> None:
    """One denoising step for every request, in ONE UNet call over all their rows.

    Requests with the same adapter set are placed side by side, so each set's rows are one
    contiguous slice (views, not gathers, in the LoRA layers); rows are batch-invariant, so the
    order changes no result.
    """
    requests = sorted(requests, key=lambda r: set_key(r.adapters))
    rows = [r.sampler.rows() for r in requests]
    x = torch.cat([r.latents for r in rows])  # (rows, C, h, w)
    t = torch.cat([r.timestep.reshape(1).expand(r.latents.shape[0]) for r in rows])  # (rows,) per-row timesteps
    text = torch.cat([r.text for r in rows])  # (rows, T, D)
    w_emb = guidance_embedding(torch.cat([r.guidance for r in rows])).to(x.device, x.dtype)  # (rows, E)
    row_sets = [req.adapters for req, r in zip(requests, rows) for _ in range(r.latents.shape[0])]
    with registry.active(row_sets):
        eps = model.unet(x, t, encoder_hidden_states=text, timestep_cond=w_emb).sample  # (rows, C, h, w)
    for req, share in zip(requests, eps.split([r.latents.shape[0] for r in rows])):
        req.sampler.advance(share)


@torch.no_grad()
def finish_request(model: DiffusionModel, request: Request) -> Image.Image:
    t0 = time.perf_counter()
    image = model.decode(request.sampler.latents)[0]
    request.timings_ms["decode"] = (time.perf_counter() - t0) * 1e3
    return image


@dataclass
class Generated:
    images: list[Image.Image]
    unet_evaluations: int  # UNet rows per image: 2 per step with CFG, 1 single-eval
    mode: str  # "cfg" or "single-eval"
    timings_ms: dict[str, float] = field(default_factory=dict)  # summed over the images


def generate(model: DiffusionModel, prompts: list[str], seeds: list[int], guidance: float, steps: int,
             scheduler: str = "ddim", adapters: AdapterSet = (), rescale: float = 0.0,
             height: int | None = None, width: int | None = None) -> Generated:
    """Several prompts with the same settings, stepped together (each image as if alone)."""
    registry = AdapterRegistry.of(model)
    requests = [start_request(model, p, s, guidance, steps, scheduler, adapters, rescale, height, width)
                for p, s in zip(prompts, seeds)]
    t0 = time.perf_counter()
    while not requests[0].sampler.done:
        unet_step(model, registry, requests)
    denoise_ms = (time.perf_counter() - t0) * 1e3
    images = [finish_request(model, r) for r in requests]
    timings = {k: sum(r.timings_ms[k] for r in requests) for k in ("text_encode", "decode")}
    return Generated(images, requests[0].unet_evaluations, requests[0].mode, {**timings, "denoise": denoise_ms})
