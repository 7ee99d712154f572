"""One loader for the toy model and for Stable Diffusion 1.x, 2.x and SDXL folders."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from distillery.model import DiffusionModel
from distillery.paths import EMBEDDED_MODEL, EMBEDDED_XL_MODEL
from distillery.sampling.pipeline import generate
from distillery.sampling.plan import config_max_steps
from distillery.sampling.sampler import initial_noise
from distillery.testing.sd15 import save_sd15_folder


def test_embedded_toy_model_loads_with_stock_diffusers_too():
    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL, safety_checker=None)
    image = pipe("a red circle", num_inference_steps=2, guidance_scale=2.0, output_type="pil").images[0]
    assert image.size == (32, 32)


def test_toy_model_components(toy_model):
    assert toy_model.latent_factor == 2 and toy_model.default_size == 32
    assert toy_model.text_encoder.config.hidden_size == toy_model.unet.config.cross_attention_dim
    assert toy_model.tokenizer("a red circle").input_ids[1:4] != toy_model.tokenizer("a blue circle").input_ids[1:4]
    assert len(toy_model.fingerprint) == 16


def test_sd15_shaped_folder_loads_and_samples_with_the_same_code(tmp_path, toy_model):
    folder = save_sd15_folder(tmp_path / "sd15", toy_model.tokenizer)
    model = DiffusionModel.from_pretrained(folder, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.unet.parameters())
    assert 855e6 < n_params < 865e6, n_params  # SD 1.5's UNet: 859.5M
    assert model.latent_factor == 8 and model.default_size == 512
    assert config_max_steps(model.scheduler_config) == 999 and config_max_steps(toy_model.scheduler_config) == 1000  # SD's "leading" spacing with offset 1
    assert model.unet.config.cross_attention_dim == 768 == model.text_encoder.config.hidden_size
    out = generate(model, ["a red circle"], [0], 2.0, steps=1, scheduler="ddim", height=64, width=64)
    assert out.images[0].size == (64, 64)
    assert model.fingerprint != toy_model.fingerprint


def test_the_embedded_sdxl_toy_loads_in_stock_diffusers_with_no_missing_or_unexpected_keys():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    for cls, part in ((UNet2DConditionModel, "unet"), (CLIPTextModel, "text_encoder"),
                      (CLIPTextModelWithProjection, "text_encoder_2")):
        _, info = cls.from_pretrained(EMBEDDED_XL_MODEL, subfolder=part, output_loading_info=True)
        assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (part, info)
    assert DiffusionModel.from_pretrained(EMBEDDED_XL_MODEL).family == "sdxl"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "toy", "toy-xl"])
def test_the_cfg_path_draws_what_stock_diffusers_draws_from_the_same_latents(family, random_toy_folder,
                                                                             sd2_style_folder, random_toy_xl_folder):
    """Random-weight folders of each family, and the two trained toys the project ships."""
    folder = {"sd1": random_toy_folder, "sd2": sd2_style_folder, "sdxl": random_toy_xl_folder,
              "toy": EMBEDDED_MODEL, "toy-xl": EMBEDDED_XL_MODEL}[family]
    model = DiffusionModel.from_pretrained(folder)
    w, steps, rescale = 2.0, 6, (0.7 if family == "sd2" else 0.0)  # SD 2.x's zero-SNR recipe rescales CFG
    ours = generate(model, ["a red circle"], [3], w, steps, scheduler="ddim", rescale=rescale).images[0]
    pipe = (StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False) if model.family == "sdxl" else
            StableDiffusionPipeline.from_pretrained(folder, safety_checker=None))
    latents = initial_noise(3, model.latent_shape(32, 32), "cpu", torch.float32)
    stock = pipe("a red circle", num_inference_steps=steps, guidance_scale=1 + w, guidance_rescale=rescale,
                 latents=latents, height=32, width=32).images[0]  # diffusers' scale is 1 + w
    difference = np.abs(np.asarray(ours, dtype=int) - np.asarray(stock, dtype=int))
    assert difference.max() <= 1 and difference.mean() < 0.01, (difference.max(), difference.mean())


def test_an_sdxl_folder_conditions_on_both_encoders_pooled_embeds_and_the_size(random_toy_xl_folder):
    model = DiffusionModel.from_pretrained(random_toy_xl_folder)
    assert model.text_encoder_2 is not None and model.zero_unconditional  # the folder's force_zeros_for_empty_prompt
    cond = model.encode_prompts(["a red circle", "", None])
    width = model.text_encoder.config.hidden_size + model.text_encoder_2.config.hidden_size
    assert cond.text.shape == (3, model.tokenizer.model_max_length, width) == (3, 16, 64)
    assert cond.pooled.shape == (3, model.text_encoder_2.config.projection_dim)
    assert cond.text[1].abs().sum() > 0 and cond.text[2].abs().sum() == 0 == cond.pooled[2].abs().sum()
    with pytest.raises(ValueError, match="image size"):
        cond.unet_kwargs()  # SDXL's size ids are part of its conditioning: no call without them
    sized = cond.sized(48, 32)
    assert sized.time_ids.tolist() == [[48, 32, 0, 0, 48, 32]] * 3  # original size, crop corner, target size
    x, t = torch.randn(1, *model.latent_shape(48, 32)), torch.tensor([500])
    with torch.no_grad():
        at = {size: model.unet(x, t, **cond[:1].sized(*size).unet_kwargs()).sample for size in ((48, 32), (32, 48))}
    assert not torch.equal(at[48, 32], at[32, 48])  # the size ids reach the UNet
    assert model.encode_prompts([None]).pooled is not None


def test_without_a_negative_prompt_sd_encodes_the_empty_one(random_toy_folder):
    model = DiffusionModel.from_pretrained(random_toy_folder)
    none, empty = model.encode_prompts([None]), model.encode_prompts([""])
    assert torch.equal(none.text, empty.text) and none.text.abs().sum() > 0 and none.pooled is None
    assert none.sized(32, 32) is none  # no micro-conditioning in SD 1.x / 2.x
