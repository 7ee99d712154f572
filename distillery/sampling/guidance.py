"""Guidance-weight conditioning for single-evaluation guided sampling.

Meng et al. 2022 (arXiv 2210.03142) stage 1: a student that takes w as input matches the
classifier-free-guided teacher in one evaluation. The student sees w through diffusers'
own `time_cond_proj_dim` / `timestep_cond` path (as LCM does): a sinusoidal embedding of w
is projected by `time_embedding.cond_proj` and added to the timestep embedding's input.
The projection is zero-initialised, so an untrained student equals the conditional teacher.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

EMBEDDING_DIM = 256  # LCM's choice for SD; the toy uses the same


def guidance_embedding(w: torch.Tensor, dim: int = EMBEDDING_DIM) -> torch.Tensor:
    """(B,) guidance weights -> (B, dim) sinusoidal features of 1000 w (LCM's scaling)."""
    return get_timestep_embedding(w.float() * 1000.0, dim, flip_sin_to_cos=True, downscale_freq_shift=0)


def new_projection(unet, dim: int = EMBEDDING_DIM) -> nn.Linear:
    """A zero-initialised w projection shaped for `unet`'s timestep embedding."""
    proj = nn.Linear(dim, unet.time_embedding.linear_1.in_features, bias=False)
    nn.init.zeros_(proj.weight)
    return proj.to(device=unet.device, dtype=unet.dtype)


def install_projection(unet, proj: nn.Linear | None) -> None:
    """Point the UNet's `cond_proj` at `proj` (a reference, no copy); None removes it."""
    unet.time_embedding.cond_proj = proj  # used only when the UNet is called with timestep_cond
