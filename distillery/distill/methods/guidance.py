"""Guidance distillation with LoRA over a shared, frozen W0.

Meng et al. 2022 (arXiv 2210.03142), stage 1: the student, given w, matches the teacher's
classifier-free-guided prediction (1 + w) eps(x_t, c) - w eps(x_t, empty) in one evaluation.
Golnari 2023 (arXiv 2312.06899): student = W0 + BA (peft LoRA), teacher = the same module
with adapters off, so there is one copy of the UNet in memory. The teacher pass runs under
no_grad (nothing kept), the student uses gradient checkpointing: activation memory stays
small next to W0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from peft import LoraConfig
from torch import nn

from distillery.adapters import save_adapter
from distillery.distill.training.loop import AdapterTrainConfig, Batch, adapter_meta, make_accelerator, train_student
from distillery.distill.training.student import start_from
from distillery.model import Conditioning, DiffusionModel
from distillery.sampling.guidance import EMBEDDING_DIM, guidance_embedding

ADAPTER_NAME = "guidance"
DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


@dataclass
class GuidanceDistillConfig(AdapterTrainConfig):
    out: str = "models/adapters/guidance-toy"
    work: str = ".work/guidance"
    steps: int = 2000
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    recommended_steps: int = 25
    init_from: str = ""  # an adapter to start from (e.g. the unpruned base's, for a pruned base); "": fresh


def attach_student(unet, cfg: AdapterTrainConfig, adapter_name: str = ADAPTER_NAME) -> nn.Linear:
    """Add the LoRA adapter and the w projection to the (frozen) base UNet, in place."""
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=cfg.target_modules,
                                init_lora_weights=True), adapter_name=adapter_name)  # B = 0: student == teacher
    return attach_projection(unet)


def attach_projection(unet) -> nn.Linear:
    """The UNet's `cond_proj` becomes a w projection, zero-initialised: the untrained student equals the
    conditional teacher."""
    projection = nn.Linear(EMBEDDING_DIM, unet.time_embedding.linear_1.in_features, bias=False)
    nn.init.zeros_(projection.weight)
    unet.time_embedding.cond_proj = projection.to(device=unet.device, dtype=unet.dtype)  # used with timestep_cond
    return unet.time_embedding.cond_proj


def distillation_step(student, unet, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                      guidance: torch.Tensor, noise_scheduler: DDPMScheduler,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """The loss of one batch: latents (B, C, h, w), cond/uncond (B rows each), guidance w (B,).

    `student` is the module to train through (the DDP wrapper under several processes), `unet` the
    same UNet unwrapped, whose adapters are switched off for the teacher pass.
    """
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                      device=latents.device)
    x_t = noise_scheduler.add_noise(latents, noise, t)  # (B, C, h, w)
    with torch.no_grad():
        target = cfg_teacher_eps(unet, x_t, t, cond, uncond, guidance)
    eps = student(x_t, t, **cond.unet_kwargs(), timestep_cond=guidance_embedding(guidance).to(x_t.dtype)).sample
    return F.mse_loss(eps.float(), target.float())


def cfg_teacher_eps(unet, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning,
                    guidance: torch.Tensor) -> torch.Tensor:
    """The teacher: W0 alone (adapters off), both CFG branches in one batch: (1 + w) eps_c - w eps_u (the base's
    own output, eps or v: the combination is linear in either)."""
    unet.disable_adapters()
    try:
        eps_c, eps_u = unet(torch.cat([x_t, x_t]), torch.cat([t, t]),
                            **Conditioning.cat([cond, uncond]).unet_kwargs()).sample.chunk(2)
    finally:
        unet.enable_adapters()
    return eps_c + guidance.view(-1, 1, 1, 1).to(eps_c.dtype) * (eps_c - eps_u)


def distill_guidance(cfg: GuidanceDistillConfig) -> Path:
    accelerator = make_accelerator(cfg)
    model = DiffusionModel.from_pretrained(cfg.model, device=accelerator.device)
    base_fingerprint = model.fingerprint
    if cfg.init_from:
        projection = start_from(model.unet, Path(cfg.init_from), ADAPTER_NAME, cfg)
    else:
        projection = attach_student(model.unet, cfg)
    noise_scheduler = DDPMScheduler.from_config(model.scheduler_config)

    def loss_of(student, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        return distillation_step(student, model.unet, batch.latents, batch.cond, batch.uncond, batch.guidance,
                                 noise_scheduler, gen)

    summary = train_student(accelerator, cfg, model, loss_of, "guidance distillation")
    out = Path(cfg.out)
    if accelerator.is_main_process:
        meta = adapter_meta("guidance", cfg, base_fingerprint, summary, recommended_scheduler="ddim",
                            recommended_steps=cfg.recommended_steps)
        save_adapter(out, model.unet, ADAPTER_NAME, meta, projection)
        accelerator.print(f"saved guidance adapter to {out} ({summary['trainable_parameters']} trainable parameters)")
    return out
