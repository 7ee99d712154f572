"""Stable Diffusion 1.5 shapes with random weights, for scale and memory work without a hub.

The configs are SD 1.5's published ones (UNet ~860M, VAE ~84M, CLIP ViT-L/14 text ~123M
parameters); weights are random, which is all a benchmark of time or memory needs.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel


def sd15_unet(**overrides) -> UNet2DConditionModel:
    """diffusers' default UNet2DConditionModel is SD 1.5's but for the text width (768)."""
    return UNet2DConditionModel(**{"sample_size": 64, "cross_attention_dim": 768, **overrides})


def sd15_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    )


def sd15_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    ))


def sd15_scheduler() -> PNDMScheduler:
    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                         steps_offset=1, set_alpha_to_one=False)


def save_sd15_folder(folder: Path, tokenizer, dtype: torch.dtype = torch.float16) -> Path:
    """An SD-1.5-shaped diffusers folder with random weights; `tokenizer` stands in for CLIP's (not on disk here)."""
    folder = Path(folder)
    torch.manual_seed(0)
    sd15_unet().to(dtype).save_pretrained(folder / "unet")
    sd15_vae().to(dtype).save_pretrained(folder / "vae")
    sd15_text_encoder().to(dtype).save_pretrained(folder / "text_encoder")
    tokenizer = copy.deepcopy(tokenizer)  # the caller's stays as it is
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(folder / "tokenizer")
    sd15_scheduler().save_pretrained(folder / "scheduler")
    return folder
