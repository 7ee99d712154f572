"""SDXL shapes (and SSD-1B's, pruned from them) with random weights, for scale and memory work without a hub.

The configs are SDXL base 1.0's published ones (UNet ~2.57B parameters, CLIP ViT-L/14 ~123M and OpenCLIP
ViT-bigG/14 ~695M text encoders, the SD VAE with SDXL's scaling factor); SSD-1B's UNet (~1.33B) is
`prune_spec.level_spec(sdxl, 3)` applied to it, the same config Segmind publishes.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
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


def sdxl_unet_config() -> dict:
    return dict(SDXL_UNET)


def ssd1b_unet_config() -> dict:
    """SSD-1B: SDXL with the innermost stacks at 4 (up: 4, 4, 10), the middle up block at 2, 1, 1 and a mid
    block of one resnet."""
    with torch.device("meta"):  # only the config is read
        config = UNet2DConditionModel(**SDXL_UNET).config
    return pruned_config(config, plan_pruning(config, level_spec(config, 3)))


def unet(config: dict) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_config(config)


def sdxl_text_encoders() -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """CLIP ViT-L/14's text tower (768 wide) and OpenCLIP ViT-bigG/14's (1280 wide, projected pooled output)."""
    first = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
    second = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=1280))
    return first, second


def sdxl_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=1024,
        scaling_factor=0.13025, force_upcast=True)
