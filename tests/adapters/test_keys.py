"""LoRA keys of other tools through diffusers' converters: kohya alphas folded per layer, the rest refused."""

import pytest
import torch

from distillery.adapters import AdapterError
from distillery.adapters.keys import unet_lora_pairs

from .conftest import ALPHA_PATTERN, RANK_PATTERN, WITHOUT_ALPHA, peft_layers

SOURCE = "style.safetensors"
TO_Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


def test_kohya_layers_convert_with_their_own_rank_and_alpha(peft_unet, kohya_lora):
    pairs = unet_lora_pairs(kohya_lora, SOURCE)
    layers = peft_layers(peft_unet)
    assert set(pairs) == set(layers)
    scales = set()
    for name, layer in layers.items():
        a, b = pairs[name]
        scale = layer.scaling["default"]  # peft's alpha / r for this layer
        torch.testing.assert_close(a, layer.lora_A["default"].weight, rtol=0, atol=0)
        torch.testing.assert_close(b, layer.lora_B["default"].weight * scale)
        if name.endswith(WITHOUT_ALPHA):
            assert scale == 1.0
        scales.add((a.shape[0], scale))
    assert {r for r, _ in scales} == {4, *RANK_PATTERN.values()}  # ranks differ per layer, and so do scales
    assert len({s for _, s in scales}) >= len(ALPHA_PATTERN)


def test_diffusers_keys_pass_unscaled():
    """Files without alphas (diffusers' and peft's writers) keep scale 1, as diffusers loads them."""
    diffusers = {"unet.down_blocks.1.attentions.0.proj_in.lora.down.weight": torch.ones(2, 64, 1, 1),
                 "unet.down_blocks.1.attentions.0.proj_in.lora.up.weight": torch.ones(64, 2, 1, 1)}
    (a, b), = unet_lora_pairs(diffusers, SOURCE).values()
    assert a.shape == (2, 64, 1, 1) and torch.equal(b, torch.ones(64, 2, 1, 1))


def _refusal(lora) -> str:
    with pytest.raises(AdapterError) as info:
        unet_lora_pairs(lora, SOURCE)
    assert str(info.value).startswith(SOURCE)
    return str(info.value)


def test_text_encoder_lora_is_refused_with_its_layer_count(kohya_lora):
    te = {f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj.{part}": torch.ones(2, 2)
          for p in ("q", "v") for part in ("lora_down.weight", "lora_up.weight")}
    te["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"] = torch.tensor(1.0)
    message = _refusal({**kohya_lora, **te})
    assert "LoRA on 2 text-encoder layers" in message and "only UNet LoRA is served" in message
    peft_te = {f"text_encoder.text_model.encoder.layers.0.mlp.{fc}.lora_{part}.weight": torch.ones(2, 2)
               for fc in ("fc1", "fc2") for part in "AB"}
    assert "LoRA on 2 text-encoder layers" in _refusal(peft_te)


@pytest.mark.parametrize("key", [f"{TO_Q}.dora_scale", "unet.down_blocks.1.attentions.0.proj_in.lora_magnitude_vector"])
def test_dora_is_refused(kohya_lora, key):
    message = _refusal({**kohya_lora, key: torch.ones(1, 32)})
    assert "DoRA" in message and key in message


@pytest.mark.parametrize("key", [f"{TO_Q}.hada_w1_a", f"{TO_Q}.lokr_w1", "unet.conv_in.lora_B.bias"])
def test_other_networks_are_refused_naming_the_key(kohya_lora, key):
    message = _refusal({**kohya_lora, key: torch.ones(4, 4)})
    assert "not LoRA down/up weights" in message and repr(key) in message


def test_diffusers_conversion_errors_come_back_as_adapter_errors(kohya_lora):
    without_up = {k: v for k, v in kohya_lora.items() if k != f"{TO_Q}.lora_up.weight"}
    assert "diffusers cannot convert this LoRA file: KeyError" in _refusal(without_up)
    assert "diffusers cannot convert" in _refusal({**kohya_lora, "lora_unet_nowhere.alpha": torch.tensor(1.0)})


def test_keys_diffusers_leaves_unconverted_are_refused(kohya_lora):
    """One key outside kohya's names: diffusers converts nothing, and nothing is silently dropped."""
    message = _refusal({**kohya_lora, "unet.conv_in.lora.down.weight": torch.ones(2, 4, 3, 3)})
    assert "not UNet LoRA down/up weights after diffusers' conversion" in message and "lora_unet_" in message
