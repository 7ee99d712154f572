"""Guidance-weight conditioning for single-evaluation guided sampling.

Meng et al. 2022 (arXiv 2210.03142) stage 1: a student that takes w as input matches the
classifier-free-guided teacher in one evaluation. The student sees w through diffusers'
own `time_cond_proj_dim` / `timestep_cond` path (as LCM does): a sinusoidal embedding of w
is projected by `time_embedding.cond_proj` and added to the timestep embedding's input.
The distiller zero-initialises the projection, so an untrained student equals the conditional teacher.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import get_timestep_embedding

EMBEDDING_DIM = 256  # LCM's choice for SD; the toy uses the same


def guidance_embedding(guidance: torch.Tensor, dim: int = EMBEDDING_DIM) -> torch.Tensor:
    """(B,) guidance weights -> (B, dim) sinusoidal features of 1000 w (LCM's scaling)."""
    return get_timestep_embedding(guidance.float() * 1000.0, dim, flip_sin_to_cos=True, downscale_freq_shift=0)

