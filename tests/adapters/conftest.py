"""LoRA files as other tools write them, from a peft reference with the same weights."""

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from distillery.adapters import AdapterRegistry
from distillery.model import DiffusionModel
from distillery.paths import EMBEDDED_MODEL

# Linear layers, 1 x 1 convs (proj_in/out, conv_shortcut) and 3 x 3 convs (conv1, conv2), as kohya's LoRA and
# LoCon networks target them on SD 1.x; per-layer ranks and alphas (peft's scale alpha / r per layer)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "time_emb_proj",
           "conv1", "conv2", "conv_shortcut"]
RANK_PATTERN = {"to_k": 2, "conv1": 3, "proj_in": 6, "ff.net.2": 8}
ALPHA_PATTERN = {"to_q": 1.0, "to_k": 5.0, "conv1": 2.0, "conv2": 12.0, "ff.net.2": 8.0}
WITHOUT_ALPHA = ("ff.net.2",)  # alpha = rank: kohya may leave it out (scale 1)


@pytest.fixture(scope="module")
def served():
    """A model copy of this module's own, with serving layers (a registry modifies the UNet it serves)."""
    model = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    return model, AdapterRegistry(model)


@pytest.fixture(scope="module")
def peft_unet():
    """The toy UNet wrapped by peft with a random LoRA of per-layer ranks and alphas: the reference."""
    unet = DiffusionModel.from_pretrained(EMBEDDED_MODEL).unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8.0, target_modules=TARGETS, rank_pattern=RANK_PATTERN,
                                alpha_pattern=ALPHA_PATTERN))
    g = torch.Generator().manual_seed(0)
    for name, p in unet.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    return unet


def peft_layers(unet) -> dict[str, LoraLayer]:
    return {name: m for name, m in unet.named_modules() if isinstance(m, LoraLayer)}


@pytest.fixture(scope="module")
def kohya_lora(peft_unet) -> dict[str, torch.Tensor]:
    """peft_unet's LoRA as kohya's sd-scripts writes it for SD 1.x: "lora_unet_" + the diffusers module path
    with "_" for ".", lora_down / lora_up / alpha per layer."""
    lora = {}
    for name, layer in peft_layers(peft_unet).items():
        kohya = "lora_unet_" + name.replace(".", "_")
        lora[f"{kohya}.lora_down.weight"] = layer.lora_A["default"].weight.detach().clone()
        lora[f"{kohya}.lora_up.weight"] = layer.lora_B["default"].weight.detach().clone()
        if not name.endswith(WITHOUT_ALPHA):
            lora[f"{kohya}.alpha"] = torch.tensor(float(layer.lora_alpha["default"]))
    return lora
