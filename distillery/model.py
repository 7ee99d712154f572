"""A text-to-image model as the server and the distillers use it: a diffusers folder.

Loading goes through diffusers' / transformers' own `from_pretrained`, component by
component, so the same code loads the embedded toy model, a local Stable Diffusion 1.5
folder, or (on a connected host) a hub id.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

DEFAULTS_FILE = "distillery.json"  # optional: default guidance/steps measured for this model
IMAGES = VaeImageProcessor()  # decoded (B, 3, H, W) in [-1, 1] -> PIL, as diffusers' pipelines do


@dataclass
class DiffusionModel:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict
    defaults: dict
    fingerprint: str = ""  # of the pristine base UNet, taken at load (adapters change its state dict)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "DiffusionModel":
        path = str(path)
        kw = {"torch_dtype": dtype}
        model = cls(
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **kw),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw),
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            scheduler_config=_read_json(Path(path) / "scheduler" / "scheduler_config.json"),
            defaults=_read_json(Path(path) / DEFAULTS_FILE) if (Path(path) / DEFAULTS_FILE).exists() else {},
        )
        for module in (model.unet, model.vae, model.text_encoder):
            module.to(device).eval().requires_grad_(False)
        model.fingerprint = unet_fingerprint(model.unet)
        return model

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return self.unet.config.sample_size * self.latent_factor

    @property
    def size_step(self) -> int:
        """Image sizes must be multiples of this: the latent factor times the UNet's total downsampling."""
        return self.latent_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.latent_factor
        return (self.unet.config.in_channels, height // f, width // f)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]  # (B, T, D)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        images = self.vae.decode(latents / self.vae.config.scaling_factor).sample  # (B, 3, H, W) in [-1, 1]
        return IMAGES.postprocess(images.float(), output_type="pil")  # in fp32, whatever the model's dtype



def unet_fingerprint(unet: UNet2DConditionModel) -> str:
    """Identifies a base UNet (config + a sample of its weights) so adapters can refuse a wrong base."""
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}  # not _name_or_path: same base, any path
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, p in sorted(unet.state_dict().items())[::7]:
        h.update(name.encode())
        h.update(p.detach().flatten()[:64].half().cpu().numpy().tobytes())  # fp16: same for fp32 and fp16 copies
    return h.hexdigest()[:16]


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
