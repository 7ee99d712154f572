"""Evaluating or generating never changes the model it is given, and what training writes loads in
stock diffusers with every key accounted for (no serving-layer names such as `conv_in.base.weight`)."""

import logging

import torch
import pytest
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from distillery.distill.evaluation.alignment import alignment
from distillery.distill.toy.train import ToyTrainConfig, train_toy
from distillery.model import DiffusionModel
from distillery.paths import EMBEDDED_MODEL
from distillery.sampling.pipeline import generate


def _loads_cleanly(folder, xl: bool = False) -> None:
    parts = [(UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder")]
    for cls, sub in parts + ([(CLIPTextModelWithProjection, "text_encoder_2")] if xl else []):
        _, info = cls.from_pretrained(folder, subfolder=sub, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys"), (sub, info)


def test_generate_and_evaluation_leave_the_model_as_it_was():
    model = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    modules = [type(m) for m in model.unet.modules()]
    generate(model, ["a red circle"], [0], 2.0, steps=2)
    alignment(model, n=2, guidance=1.0, steps=2, batch=2)
    after = model.unet.state_dict()
    assert list(after) == list(before) and [type(m) for m in model.unet.modules()] == modules
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("family", ["sd", "xl"])
def test_a_tiny_train_toy_run_with_an_evaluation_writes_a_folder_stock_diffusers_loads(family, tmp_path, capsys):
    cfg = ToyTrainConfig(work=str(tmp_path / "work"), out=str(tmp_path / "out"), n_images=96, vae_steps=2, vae_batch=8,
                         unet_steps=2, unet_batch=8, warmup=1, checkpoint_every=2, eval_every=2, eval_prompts=4,
                         eval_steps=2, family=family)
    train_toy(cfg)
    assert "step 2: alignment" in capsys.readouterr().out  # the in-training evaluation ran
    _loads_cleanly(tmp_path / "out", xl=family == "xl")
    pipe = (StableDiffusionXLPipeline.from_pretrained(tmp_path / "out", add_watermarker=False) if family == "xl" else
            StableDiffusionPipeline.from_pretrained(tmp_path / "out", safety_checker=None))
    assert pipe("a red circle", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
    model = DiffusionModel.from_pretrained(tmp_path / "out")
    assert (model.text_encoder_2 is not None) == model.zero_unconditional == (family == "xl")


def test_the_toy_family_is_checked_naming_the_field():
    with pytest.raises(ValueError, match=r"family must be one of \['sd', 'xl'\], got 'sdxl'"):
        ToyTrainConfig(family="sdxl")


def test_a_tiny_distill_guidance_run_leaves_its_base_folder_and_loads_in_stock_diffusers(random_toy_folder, tmp_path,
                                                                                       caplog):
    from distillery.distill.methods.guidance import GuidanceDistillConfig, distill_guidance

    base_fingerprint = DiffusionModel.from_pretrained(random_toy_folder).fingerprint
    out = distill_guidance(GuidanceDistillConfig(model=str(random_toy_folder), data="toy:16", out=str(tmp_path / "a"),
                                                 work=str(tmp_path / "w"), steps=1, batch=2, checkpoint_every=1, rank=4))
    _loads_cleanly(random_toy_folder)
    assert DiffusionModel.from_pretrained(random_toy_folder).fingerprint == base_fingerprint
    pipe = StableDiffusionPipeline.from_pretrained(random_toy_folder, safety_checker=None)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(out)
    assert not [r for r in caplog.records if "unexpected keys" in r.getMessage() or "missing keys" in r.getMessage()]
    from safetensors.torch import load_file

    layers = {k.rsplit(".lora", 1)[0] for k in load_file(str(out / "pytorch_lora_weights.safetensors"))}
    injected = {n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "default_0" in m.lora_A}
    assert len(injected) == len(layers) > 0
