"""Scheduler loops: classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598).

Guidance convention (Meng et al. 2022, arXiv 2210.03142): w is the guidance weight in
    eps = (1 + w) * eps(c) - w * eps(empty),
so w = 0 is the plain conditional model; diffusers' guidance_scale equals 1 + w.

Samplers never import models: they get a `denoise(latents, t, text) -> eps` callable,
and a diffusers scheduler instance per request.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm": DPMSolverMultistepScheduler}

Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_scheduler(name: str, config: dict):
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
    return SCHEDULERS[name].from_config(config)


def initial_noise(seeds: list[int], shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """One generator per row: an image depends on its own seed only, never on its batch."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)  # (B, C, h, w)


def guided(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w: torch.Tensor, rescale: float = 0.0) -> torch.Tensor:
    """(1 + w) eps_c - w eps_u per row; optional std rescale (Lin et al. 2023, arXiv 2305.08891)."""
    w = w.view(-1, 1, 1, 1).to(eps_cond.dtype)
    eps = eps_cond + w * (eps_cond - eps_uncond)
    return rescale_noise_cfg(eps, eps_cond, guidance_rescale=rescale) if rescale > 0 else eps


@torch.no_grad()
def sample_cfg(denoise: Denoise, scheduler, cond: torch.Tensor, uncond: torch.Tensor, guidance: torch.Tensor,
               latents: torch.Tensor, steps: int, rescale: float = 0.0,
               on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Teacher sampling: per step ONE batched UNet call over [uncond; cond] rows (2B rows).

    cond, uncond: (B, T, D) text embeddings; guidance: (B,) w per row; latents: (B, C, h, w) noise.
    Returns denoised latents (B, C, h, w).
    """
    scheduler.set_timesteps(steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    text = torch.cat([uncond, cond])  # (2B, T, D)
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.scale_model_input(torch.cat([latents, latents]), t)  # (2B, C, h, w)
        eps_uncond, eps_cond = denoise(x, t, text).chunk(2)
        latents = scheduler.step(guided(eps_cond, eps_uncond, guidance, rescale), t, latents).prev_sample
        if on_step:
            on_step(i)
    return latents


@torch.no_grad()
def sample_single(denoise_w: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                  scheduler, cond: torch.Tensor, guidance: torch.Tensor, latents: torch.Tensor, steps: int,
                  on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Guidance-distilled sampling (Meng et al. 2022 stage 1): ONE UNet call of B rows per step.

    `denoise_w(latents, t, text, w)` is the w-conditioned student; cond (B, T, D); guidance (B,).
    """
    scheduler.set_timesteps(steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        eps = denoise_w(scheduler.scale_model_input(latents, t), t, cond, guidance)  # (B, C, h, w)
        latents = scheduler.step(eps, t, latents).prev_sample
        if on_step:
            on_step(i)
    return latents
