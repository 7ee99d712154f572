"""Per-request sampling state machines: classifier-free guidance (Ho & Salimans 2022,
arXiv 2207.12598) with two UNet rows per step, and guidance-distilled sampling (Meng et al.
2022, arXiv 2210.03142, stage 1) with one w-conditioned row per step, in few steps too with
a step-distilled adapter (LCMScheduler for consistency, DDIM at its trained count for progressive).

Guidance convention (Meng et al.): w is the guidance weight in
    eps = (1 + w) * eps(c) - w * eps(empty),
so w = 0 is the plain conditional model; diffusers' guidance_scale equals 1 + w.

The loop is inverted for step-level batching: a sampler says what rows it needs for its
next step (`rows()`), someone evaluates the UNet on many samplers' rows at once, and the
sampler takes its share back (`advance()`). Samplers never import models; each owns its
diffusers scheduler instance, so rows at different timesteps share one UNet call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, LCMScheduler)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from distillery.model import Conditioning

SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
              "dpm": DPMSolverMultistepScheduler, "lcm": LCMScheduler}


def make_scheduler(name: str, config: dict, overrides: dict | None = None):
    """Scheduler `name` from the base's config, with an adapter's `overrides` (LCM's original_inference_steps)."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
    return SCHEDULERS[name].from_config({**config, **(overrides or {})})


def initial_noise(seed: int, shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """Noise from the request's own generator: an image depends on its seed only, never on its batch."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))).to(device=device, dtype=dtype)[None]


def step_noise(seed: int) -> torch.Generator:
    """The request's generator for noise its scheduler adds between steps (LCM, ancestral): seed-determined too."""
    return torch.Generator().manual_seed(int(seed) + 1)


def guided(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w: float, rescale: float = 0.0) -> torch.Tensor:
    """(1 + w) eps_c - w eps_u; optional std rescale (Lin et al. 2023, arXiv 2305.08891)."""
    eps = eps_cond + w * (eps_cond - eps_uncond)
    return rescale_noise_cfg(eps, eps_cond, guidance_rescale=rescale) if rescale > 0 else eps


@dataclass
class Rows:
    """One step's UNet input rows for one sampler."""

    latents: torch.Tensor  # (k, C, h, w), scaled for the scheduler
    timestep: torch.Tensor  # scalar
    cond: Conditioning  # k rows
    guidance: torch.Tensor  # (k,) w fed to the w projection (rows without a distilled adapter ignore it)


class GuidedSampler:
    """One image. `uncond` given -> CFG (2 rows per step); None -> single-eval (1 row, w-conditioned)."""

    def __init__(self, scheduler, noise: torch.Tensor, steps: int, w: float, cond: Conditioning,
                 uncond: Conditioning | None, rescale: float = 0.0, generator: torch.Generator | None = None,
                 eta: float = 0.0):
        self.scheduler, self.w, self.rescale, self.generator = scheduler, float(w), rescale, generator
        self.step_kwargs = {"eta": eta} if eta else {}  # DDIM's eta (Song et al.): 0 deterministic, 1 DDPM-like
        scheduler.set_timesteps(steps, device=noise.device)
        self.timesteps = scheduler.timesteps
        self.latents = noise * scheduler.init_noise_sigma  # (1, C, h, w)
        self.cond = cond if uncond is None else Conditioning.cat([uncond, cond])  # 1 or 2 rows
        self.step_index = 0

    @property
    def cfg(self) -> bool:
        return self.cond.rows == 2

    @property
    def n_rows(self) -> int:
        return self.cond.rows

    @property
    def done(self) -> bool:
        return self.step_index >= len(self.timesteps)

    def rows(self) -> Rows:
        t = self.timesteps[self.step_index]
        x = self.scheduler.scale_model_input(self.latents, t).expand(self.n_rows, -1, -1, -1)
        return Rows(x, t, self.cond, torch.full((self.n_rows,), self.w))

    def advance(self, eps: torch.Tensor) -> None:
        """eps: (n_rows, C, h, w), this sampler's share of the UNet output, in rows() order."""
        if self.cfg:
            eps = guided(eps[1:2], eps[0:1], self.w, self.rescale)
        t = self.timesteps[self.step_index]
        self.latents = self.scheduler.step(eps, t, self.latents, generator=self.generator, **self.step_kwargs).prev_sample
        self.step_index += 1
