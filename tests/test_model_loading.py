"""One loader for the toy model and for Stable Diffusion 1.x and 2.x folders."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from distillery.model import DiffusionModel
from distillery.paths import EMBEDDED_MODEL
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


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_the_cfg_path_draws_what_stock_diffusers_draws_from_the_same_latents(family, random_toy_folder,
                                                                             sd2_style_folder):
    folder = random_toy_folder if family == "sd1" else sd2_style_folder
    model = DiffusionModel.from_pretrained(folder)
    w, steps, rescale = 2.0, 6, (0.7 if family == "sd2" else 0.0)  # SD 2.x's zero-SNR recipe rescales CFG
    ours = generate(model, ["a red circle"], [3], w, steps, scheduler="ddim", rescale=rescale).images[0]
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    latents = initial_noise(3, model.latent_shape(32, 32), "cpu", torch.float32)
    stock = pipe("a red circle", num_inference_steps=steps, guidance_scale=1 + w, guidance_rescale=rescale,
                 latents=latents, height=32, width=32).images[0]  # diffusers' scale is 1 + w
    difference = np.abs(np.asarray(ours, dtype=int) - np.asarray(stock, dtype=int))
    assert difference.max() <= 1 and difference.mean() < 0.01, (difference.max(), difference.mean())
