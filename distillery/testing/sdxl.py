"""SDXL shapes (and SSD-1B's, pruned from them) with random weights, for scale and memory work without a hub.

The configs are SDXL base 1.0's published ones (UNet ~2.57B parameters, CLIP ViT-L/14 ~123M and OpenCLIP
ViT-bigG/14 ~695M text encoders, the SD VAE with SDXL's scaling factor and fp32 decoding); SSD-1B's UNet
(~1.33B) is `prune_spec.level_spec(sdxl, 3)` applied to SDXL's config, the config Segmind publishes.
`narrow=True` keeps every structural choice (blocks, depths 1/2/10, two encoders, text_time) at toy widths,
for quick runs.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from distillery.distill.methods.prune_spec import level_spec, plan_pruning
from distillery.distill.methods.pruned_unet import pruned_config

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 size ids x 256 + the pooled 1280
)
NARROW_UNET = {**SDXL_UNET, "block_out_channels": (32, 64, 128), "attention_head_dim": (2, 4, 8),
               "cross_attention_dim": 64, "addition_time_embed_dim": 8, "norm_num_groups": 16,
               "projection_class_embeddings_input_dim": 6 * 8 + 32}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules directly in `dtype` (an fp32 SDXL UNet is 10 GB before any cast)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def sdxl_unet_config(narrow: bool = False) -> dict:
    return dict(NARROW_UNET if narrow else SDXL_UNET)


def ssd1b_unet_config(narrow: bool = False) -> dict:
    """SSD-1B: SDXL with the innermost stacks at 4 (up: 4, 4, 10), the middle up block at 2, 1, 1 and a mid
    block of one resnet."""
    with torch.device("meta"):  # only the config is read
        config = UNet2DConditionModel(**sdxl_unet_config(narrow)).config
    return pruned_config(config, plan_pruning(config, level_spec(config, 3)))


def sdxl_text_encoders(narrow: bool = False) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """CLIP ViT-L/14's text tower (768 wide) and OpenCLIP ViT-bigG/14's (1280 wide, projected pooled output)."""
    first = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu", projection_dim=768)
    second = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  hidden_act="gelu", projection_dim=1280)
    if narrow:
        first = second = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              hidden_act="gelu", projection_dim=32)
    shared = dict(vocab_size=49408, max_position_embeddings=77)
    return CLIPTextModel(CLIPTextConfig(**shared, **first)), CLIPTextModelWithProjection(CLIPTextConfig(**shared,
                                                                                                        **second))


def sdxl_vae(narrow: bool = False) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 32, 32, 32) if narrow else (128, 256, 512, 512),
        norm_num_groups=16 if narrow else 32, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=1024,
        scaling_factor=0.13025, force_upcast=True)


def sdxl_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  timestep_spacing="leading", steps_offset=1)


def save_sdxl_folder(folder: Path, tokenizer, narrow: bool = False, dtype: torch.dtype = torch.float16) -> Path:
    """An SDXL-shaped diffusers folder with random weights, written by stock StableDiffusionXLPipeline;
    `tokenizer` stands in for CLIP's (not on disk here) in both tokenizer folders."""
    torch.manual_seed(0)
    tokenizer = copy.deepcopy(tokenizer)  # the caller's stays as it is
    tokenizer.model_max_length = 77
    with default_dtype(dtype if dtype != torch.float16 else torch.bfloat16):  # fp16 init is slow on CPU
        text_encoder, text_encoder_2 = sdxl_text_encoders(narrow)
        pipe = StableDiffusionXLPipeline(
            vae=sdxl_vae(narrow), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=UNet2DConditionModel(**sdxl_unet_config(narrow)),
            scheduler=sdxl_scheduler(), add_watermarker=False)
    pipe.to(dtype).save_pretrained(folder)
    return Path(folder)
