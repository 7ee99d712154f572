"""A text-to-image model as the server and the distillers use it: a diffusers folder.

Loading goes through diffusers' / transformers' own `from_pretrained`, component by
component, so the same code loads the embedded toy model, a local Stable Diffusion 1.x / 2.x
folder, an SDXL one (two text encoders), or (on a connected host) a hub id. The model's family
decides how prompts become the UNet's conditioning, here and nowhere else: `encode_prompts`
gives a `Conditioning` that every UNet call spreads into its keyword arguments.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

DEFAULTS_FILE = "distillery.json"  # optional: default guidance/steps measured for this model
IMAGES = VaeImageProcessor()  # decoded (B, 3, H, W) in [-1, 1] -> PIL, as diffusers' pipelines do


@dataclass(frozen=True)
class Conditioning:
    """What the UNet is conditioned on, row by row: the text states, and for SDXL-family UNets (`text_time`
    added conditioning) the pooled text embeds and the size ids (original size, crop corner, target size)."""

    text: torch.Tensor  # (rows, T, D)
    pooled: torch.Tensor | None = None  # (rows, P): SDXL's second text encoder's projected embeds
    time_ids: torch.Tensor | None = None  # (rows, 6): set by `sized`, once the image size is known

    @property
    def rows(self) -> int:
        return self.text.shape[0]

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.text, self.pooled, self.time_ids

    def map(self, fn) -> Conditioning:
        """The same conditioning with `fn` applied to each of its tensors (slices, repeats, copies, casts)."""
        return Conditioning(*(None if v is None else fn(v) for v in self.tensors()))

    def __getitem__(self, rows) -> Conditioning:
        return self.map(lambda v: v[rows])

    def repeat(self, n: int) -> Conditioning:
        return self.map(lambda v: v.repeat(n, *([1] * (v.dim() - 1))))

    def kept(self, keep: torch.Tensor) -> Conditioning:
        """Rows where `keep` (rows,) is False become zeros: SDXL's unconditional branch, trained and sampled."""
        return self.map(lambda v: v * keep.view(-1, *[1] * (v.dim() - 1)).to(v.device, v.dtype))

    def split(self, sizes: list[int]) -> list[Conditioning]:
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [self[a:a + k] for a, k in zip(starts, sizes)]

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        if len(parts) == 1:
            return parts[0]
        columns = zip(*(p.tensors() for p in parts))
        return Conditioning(*(None if c[0] is None else torch.cat(c) for c in columns))

    def sized(self, height: int, width: int) -> Conditioning:
        """For an image of this size: SDXL's micro-conditioning as its pipeline's defaults make it (original =
        target = the size, no crop); a family without it is unchanged."""
        if self.pooled is None:
            return self
        ids = torch.tensor([height, width, 0, 0, height, width], device=self.text.device, dtype=self.text.dtype)
        return replace(self, time_ids=ids.repeat(self.rows, 1))

    def unet_kwargs(self) -> dict:
        """The keyword arguments of a diffusers UNet call."""
        return unet_kwargs(*self.tensors())


def unet_kwargs(text: torch.Tensor, pooled: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> dict:
    """A conditioning's tensors as a diffusers UNet call takes them (a function: compiled code calls it too)."""
    if pooled is None:
        return {"encoder_hidden_states": text}
    if time_ids is None:
        raise ValueError("an SDXL-family conditioning needs its image size first (Conditioning.sized)")
    return {"encoder_hidden_states": text, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


@dataclass
class DiffusionModel:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict
    defaults: dict
    fingerprint: str = ""  # of the pristine base UNet, taken at load (adapters change its state dict)
    # SDXL family: the second encoder (penultimate states concatenated with the first's; pooled embeds)
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    zero_unconditional: bool = False  # SDXL's force_zeros_for_empty_prompt: no negative prompt -> zeros

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "DiffusionModel":
        path = Path(path)
        kw = {"torch_dtype": dtype}
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        xl = unet.config.addition_embed_type == "text_time"
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        if dtype == torch.float16 and vae.config.force_upcast:  # SDXL's VAE overflows in fp16: it decodes in fp32
            vae = vae.to(torch.float32)
        pipeline = _read_json(path / "model_index.json") if (path / "model_index.json").exists() else {}
        model = cls(
            unet=unet, vae=vae,
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw),
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            scheduler_config=_read_json(path / "scheduler" / "scheduler_config.json"),
            defaults=_read_json(path / DEFAULTS_FILE) if (path / DEFAULTS_FILE).exists() else {},
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw)
            if xl else None,
            tokenizer_2=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2") if xl else None,
            zero_unconditional=xl and pipeline.get("force_zeros_for_empty_prompt", True),
        )
        for module in model.modules():
            module.to(device).eval().requires_grad_(False)
        model.fingerprint = unet_fingerprint(model.unet)
        return model

    @property
    def family(self) -> str:
        """"sdxl" (two text encoders, added conditioning) or "sd" (SD 1.x and 2.x: one encoder)."""
        return "sd" if self.text_encoder_2 is None else "sdxl"

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2) if m is not None]

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
    def encode_prompts(self, prompts: list[str | None]) -> Conditioning:
        """Each prompt's conditioning, as the family's diffusers pipeline makes it. None is the unconditional
        branch without a negative prompt: the empty prompt's states, or zeros where the folder says so (SDXL).
        SDXL's carries no size yet (`Conditioning.sized`)."""
        text = [p or "" for p in prompts]
        cond = encode_token_ids(self.text_encoder, self._token_ids(self.tokenizer, text), self.text_encoder_2,
                                self._token_ids(self.tokenizer_2, text) if self.tokenizer_2 else None)
        cond = cond.map(lambda v: v.to(self.dtype))
        if self.zero_unconditional and None in prompts:
            cond = cond.kept(torch.tensor([p is not None for p in prompts]))
        return cond

    def _token_ids(self, tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        config = self.vae.config
        latents = latents.to(self.vae.dtype)  # fp32 where the VAE is upcast (force_upcast)
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean, std = (torch.tensor(v, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
                         for v in (config.latents_mean, config.latents_std))
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        images = self.vae.decode(latents).sample  # (B, 3, H, W) in [-1, 1]
        return IMAGES.postprocess(images.float(), output_type="pil")  # in fp32, whatever the model's dtype



def encode_token_ids(text_encoder: CLIPTextModel, ids: torch.Tensor,
                     text_encoder_2: CLIPTextModelWithProjection | None = None,
                     ids_2: torch.Tensor | None = None) -> Conditioning:
    """The family's rule from token ids to conditioning (gradients flow: the toys' training calls it too).
    SD 1.x / 2.x: the encoder's last layer. SDXL: both encoders' penultimate states side by side, and the
    second's pooled projection."""
    if text_encoder_2 is None:
        return Conditioning(text_encoder(ids)[0])  # (B, T, D)
    first = text_encoder(ids, output_hidden_states=True)
    second = text_encoder_2(ids_2, output_hidden_states=True)
    return Conditioning(torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds)


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
