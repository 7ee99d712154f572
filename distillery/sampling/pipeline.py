"""Text -> image: denoisings become samplers, samplers share UNet calls, latents become PNGs.

`unet_step` is the one place that turns the rows of many samplers (any timesteps, w, adapter
sets and schedulers) into UNet calls: one per latent shape in throughput mode, one per image
row in deterministic mode. The engine calls it per step for whatever is in flight, and
`generate` (CLI, evaluation, benchmarks) runs a fixed list of prompts through it.
Neither changes the model: adapters need a registry, whose making installed the serving layers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from distillery.adapters import AdapterRegistry, AdapterSet, set_key
from distillery.model import Conditioning, DiffusionModel
from distillery.sampling.guidance import guidance_embedding
from distillery.sampling.plan import Ask, ModelLimits, SamplingPlan, plan_sampling
from distillery.sampling.sampler import GuidedSampler, initial_noise, make_scheduler, step_noise


@dataclass
class Denoising:
    """One image in flight: its plan, its sampler, its adapters, its clocks."""

    plan: SamplingPlan
    sampler: GuidedSampler
    adapters: AdapterSet
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return self.plan.mode

    @property
    def unet_evaluations(self) -> int:
        return self.plan.rows_per_step * len(self.sampler.timesteps)


def encode_together(model: DiffusionModel, prompt_lists: list[list[str | None]]) -> tuple[list[Conditioning], float]:
    """Every request's prompts in ONE text-encoder call (throughput mode): (per request k rows, ms)."""
    t0 = time.perf_counter()
    cond = model.encode_prompts([p for prompts in prompt_lists for p in prompts])  # sum k rows
    return cond.split([len(p) for p in prompt_lists]), (time.perf_counter() - t0) * 1e3


def start_denoising(model: DiffusionModel, prompt: str, seed: int, plan: SamplingPlan, adapters: AdapterSet = (),
                    encoded: tuple[Conditioning, float] | None = None, eta: float = 0.0) -> Denoising:
    """Encode the prompt (alone, unless `encoded` = (conditioning, ms) from `encode_together`) and make the
    sampler the plan asks for (`eta`: DDIM's, from the seed's step noise)."""
    if encoded is None:
        conds, ms = encode_together(model, [plan.prompts(prompt)])
        encoded = conds[0], ms
    cond, text_ms = encoded  # rows_per_step rows: the prompt's, then the unconditional branch's (CFG)
    cond = cond.sized(plan.height, plan.width)
    noise = initial_noise(seed, model.latent_shape(plan.height, plan.width), model.device, model.dtype)
    made = make_scheduler(plan.scheduler, model.scheduler_config, plan.scheduler_overrides)
    sampler = GuidedSampler(made, noise, plan.steps, plan.guidance, cond=cond[:1],
                            uncond=None if plan.single_eval else cond[1:], rescale=plan.guidance_rescale,
                            generator=step_noise(seed), eta=eta)
    return Denoising(plan, sampler, tuple(adapters), {"text_encode": text_ms})


@torch.no_grad()
def unet_step(model: DiffusionModel, registry: AdapterRegistry | None, denoisings: list[Denoising],
              deterministic: bool = False) -> list[tuple[Denoising, Exception]]:
    """One denoising step for every request; returns the denoisings whose own scheduler step failed.

    Throughput mode: one UNet call per latent shape over all its denoisings' rows, placed by adapter set
    (each set's rows one contiguous slice: views, not gathers, in the LoRA layers). Deterministic mode:
    one call per image row, whose inputs are made from the request alone, so every operation sees the
    same shapes, layouts and values whatever else is in flight: the image's bits cannot depend on the
    batch, on any BLAS. Every UNet call runs before any sampler advances: if one raises, no request
    has moved and each can be stepped again.
    """
    if registry is None and any(r.adapters for r in denoisings):
        raise ValueError("adapters need an AdapterRegistry (making one installs the serving layers)")
    eps_of: list[tuple[Denoising, torch.Tensor]] = []
    if deterministic:
        for den in denoisings:
            rows = den.sampler.rows()
            eps = [_unet_call(model, registry, [rows.latents[i:i + 1].clone()], [rows.timestep.reshape(1)],
                              [rows.cond[i:i + 1].map(torch.clone)], [rows.guidance[i:i + 1]], [den.adapters])
                   for i in range(rows.latents.shape[0])]
            eps_of.append((den, torch.cat(eps)))
    else:
        by_shape: dict[tuple, list[Denoising]] = {}
        for den in sorted(denoisings, key=lambda r: set_key(r.adapters)):
            by_shape.setdefault(tuple(den.sampler.latents.shape), []).append(den)
        for group in by_shape.values():
            rows = [r.sampler.rows() for r in group]
            n = [r.latents.shape[0] for r in rows]
            eps = _unet_call(model, registry, [r.latents for r in rows],
                             [r.timestep.reshape(1).expand(k) for r, k in zip(rows, n)], [r.cond for r in rows],
                             [r.guidance for r in rows], [den.adapters for den, k in zip(group, n) for _ in range(k)])
            eps_of += zip(group, eps.split(n))
    failed = []
    for den, eps in eps_of:
        try:
            den.sampler.advance(eps)
        except Exception as exc:  # noqa: BLE001 - this request's own scheduler; the others go on
            failed.append((den, exc))
    return failed


def _unet_call(model: DiffusionModel, registry: AdapterRegistry | None, latents, timesteps, conds, guidance,
               row_sets: list[AdapterSet]) -> torch.Tensor:
    """eps (rows, C, h, w) for the concatenated rows; w reaches only rows whose set has a w projection."""
    x = torch.cat(latents)  # (rows, C, h, w)
    t = torch.cat(timesteps)  # (rows,) per-row timesteps
    cond = Conditioning.cat(conds)
    if registry is None:  # a plain UNet: no serving layers, no w projection
        return model.unet(x, t, **cond.unet_kwargs()).sample
    w_emb = guidance_embedding(torch.cat(guidance)).to(x.device, x.dtype)  # (rows, E)
    return registry.backend.eps(x, t, cond, w_emb, row_sets)  # (rows, C, h, w): per-row, merged or compiled


@torch.no_grad()
def finish_denoising(model: DiffusionModel, denoisings: list[Denoising], together: bool = False) -> list[Image.Image]:
    """Decode finished denoisings: one at a time, or (`together`, throughput mode) one VAE call per latent shape."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(denoisings):
        groups.setdefault(tuple(r.sampler.latents.shape) if together else (i,), []).append(i)
    images: list[Image.Image | None] = [None] * len(denoisings)
    for members in groups.values():
        t0 = time.perf_counter()
        decoded = model.decode(torch.cat([denoisings[i].sampler.latents for i in members]))
        ms = (time.perf_counter() - t0) * 1e3
        for i, image in zip(members, decoded):
            images[i] = image
            denoisings[i].timings_ms["decode"] = ms
    return images


@dataclass
class Generated:
    images: list[Image.Image]
    unet_evaluations: int  # UNet rows per image: 2 per step with CFG, 1 single-eval
    mode: str  # "cfg" or "single-eval"
    timings_ms: dict[str, float] = field(default_factory=dict)  # summed over the images


def generate(model: DiffusionModel, prompts: list[str], seeds: list[int], guidance: float, steps: int,
             scheduler: str | None = None, adapters: AdapterSet = (), rescale: float | None = None,
             height: int | None = None, width: int | None = None, registry: AdapterRegistry | None = None,
             deterministic: bool = False) -> Generated:
    """Several prompts with the same settings, stepped together, planned as a served request would be
    (scheduler: default the distilled adapter's, else DDIM). Adapters need the `registry` they were loaded into;
    without adapters the model runs as it is (a model nobody serves stays untouched)."""
    plan = plan_sampling(ModelLimits.of(model), tuple(adapters), Ask(guidance, steps, scheduler, width, height,
                                                                     guidance_rescale=rescale))
    denoisings = [start_denoising(model, p, s, plan, adapters) for p, s in zip(prompts, seeds)]
    t0 = time.perf_counter()
    while not denoisings[0].sampler.done:
        if failed := unet_step(model, registry, denoisings, deterministic):
            raise failed[0][1]
    denoise_ms = (time.perf_counter() - t0) * 1e3
    images = finish_denoising(model, denoisings, together=not deterministic)
    timings = {k: sum(r.timings_ms[k] for r in denoisings) for k in ("text_encode", "decode")}
    return Generated(images, denoisings[0].unet_evaluations, plan.mode, {**timings, "denoise": denoise_ms})
