"""The toy's style LoRA: dark horizontal stripes inside the shape, and the pixel metric that sees them.

Trained like any style LoRA (diffusers' `train_text_to_image_lora.py`: the noise-prediction loss
on the styled images, W0 frozen, no trigger word), on the same captions as the plain data, so it
composes with every distilled adapter at a per-request weight.

`stripe_score`: the share of an image's vertical variation at the stripes' period (power at that
frequency of each column's FFT over all non-constant frequencies); `style_strength` puts it on a
0..1 scale between plain images (0) and the style alone at 25-step CFG (1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from peft import LoraConfig
from PIL import Image

from distillery.adapters import save_adapter
from distillery.distill.toy.data import IMAGE_SIZE, STRIPE_PERIOD
from distillery.distill.training.ddim import noise_target, require_supported_prediction
from distillery.distill.training.loop import AdapterTrainConfig, Batch, adapter_meta, make_accelerator, train_student
from distillery.distill.training.student import start_from
from distillery.model import DiffusionModel

ADAPTER_NAME = "style"


@dataclass
class StyleTrainConfig(AdapterTrainConfig):
    data: str = "toy-stripes:50000"  # 1500 x 32 samples: one epoch
    out: str = "models/adapters/stripes-toy"
    work: str = ".work/style"
    steps: int = 1500
    batch: int = 32
    lr: float = 5e-4
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                                               "ff.net.2", "proj_in", "proj_out", "conv1", "conv2"])
    caption_dropout: float = 0.1
    gradient_checkpointing: bool = False
    init_from: str = ""  # a style adapter to start from (e.g. the unpruned base's, for a pruned base); "": fresh


def stripe_score(images: list[Image.Image]) -> float:
    """Mean share of the columns' vertical spectral power (DC excluded) at the stripe frequency."""
    gray = np.stack([np.asarray(im.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float64) for im in images])
    power = np.abs(np.fft.rfft(gray, axis=1)) ** 2  # (N, frequencies, columns): along y
    stripe = power[:, IMAGE_SIZE // STRIPE_PERIOD].sum(axis=1)
    total = power[:, 1:].sum(axis=(1, 2)) + 1e-9
    return float(np.mean(stripe / total))


def style_strength(images: list[Image.Image], plain_score: float, style_score: float) -> float:
    """0 = the stripe score of plain images, 1 = that of the style alone (both measured at 25-step CFG)."""
    return (stripe_score(images) - plain_score) / (style_score - plain_score)


def train_style(cfg: StyleTrainConfig) -> Path:
    accelerator = make_accelerator(cfg)
    model = DiffusionModel.from_pretrained(cfg.model, device=accelerator.device)
    require_supported_prediction(model.scheduler_config, "train-style")
    base_fingerprint = model.fingerprint
    if cfg.init_from:
        start_from(model.unet, Path(cfg.init_from), ADAPTER_NAME, cfg)
    else:
        model.unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=cfg.target_modules,
                                          init_lora_weights=True), adapter_name=ADAPTER_NAME)
    noise_scheduler = DDPMScheduler.from_config(model.scheduler_config)

    def loss_of(student, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        x0 = batch.latents
        noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen, device=x0.device)
        out = student(noise_scheduler.add_noise(x0, noise, t), t, **batch.cond.unet_kwargs()).sample
        return F.mse_loss(out.float(), noise_target(noise_scheduler, x0, noise, t).float())

    summary = train_student(accelerator, cfg, model, loss_of, "style LoRA")
    out = Path(cfg.out)
    if accelerator.is_main_process:
        meta = adapter_meta("style", cfg, base_fingerprint, summary)
        save_adapter(out, model.unet, ADAPTER_NAME, meta, None)
        accelerator.print(f"saved style adapter to {out} ({summary['trainable_parameters']} trainable parameters)")
    return out
