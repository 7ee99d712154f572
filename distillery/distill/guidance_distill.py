"""Guidance distillation with LoRA over a shared, frozen W0.

Meng et al. 2022 (arXiv 2210.03142), stage 1: the student, given w, matches the teacher's
classifier-free-guided prediction (1 + w) eps(x_t, c) - w eps(x_t, empty) in one evaluation.
Golnari 2023 (arXiv 2312.06899): student = W0 + BA (peft LoRA), teacher = the same module
with adapters off, so there is one copy of the UNet in memory. The teacher pass runs under
no_grad (nothing kept), the student uses gradient checkpointing: activation memory stays
small next to W0.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from peft import LoraConfig
from torch import nn
from tqdm import tqdm

from distillery.adapters import AdapterMeta, save_adapter
from distillery.distill.data import image_caption_loader
from distillery.distill.training import Progress, batches, checkpoint, keep_trainable_in_checkpoints, resume
from distillery.model import DiffusionModel
from distillery.sampling.guidance import EMBEDDING_DIM, guidance_embedding

ADAPTER_NAME = "guidance"
DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


@dataclass
class GuidanceDistillConfig:
    model: str = "models/toy"
    data: str = "toy"  # "toy" or an imagefolder with metadata.jsonl
    out: str = "models/adapters/guidance-toy"
    work: str = ".work/guidance"
    steps: int = 2000
    batch: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 100
    rank: int = 16
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    w_min: float = 0.0
    w_max: float = 5.0
    caption_dropout: float = 0.1  # the student must also handle the empty prompt
    mixed_precision: str = "no"  # "fp16" / "bf16" on GPUs
    gradient_checkpointing: bool = True
    checkpoint_every: int = 200
    recommended_steps: int = 25
    seed: int = 0


def attach_student(unet, cfg: GuidanceDistillConfig) -> nn.Linear:
    """Add the LoRA adapter and the w projection to the (frozen) base UNet, in place."""
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=cfg.target_modules,
                                init_lora_weights=True), adapter_name=ADAPTER_NAME)  # B = 0: student == teacher
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
    """The loss of one batch: latents (B, C, h, w), cond/uncond (B, T, D), guidance w (B,).

    `student` is the module to train through (the DDP wrapper under several processes), `unet` the
    same UNet unwrapped, whose adapters are switched off for the teacher pass.
    """
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                      device=latents.device)
    x_t = noise_scheduler.add_noise(latents, noise, t)  # (B, C, h, w)
    with torch.no_grad():  # teacher: W0 alone, both branches in one batch, no graph kept
        unet.disable_adapters()
        eps_c, eps_u = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=torch.cat([cond, uncond])).sample.chunk(2)
        unet.enable_adapters()
        scale = guidance.view(-1, 1, 1, 1).to(eps_c.dtype)
        target = eps_c + scale * (eps_c - eps_u)  # (1 + w) eps_c - w eps_u
    eps = student(x_t, t, encoder_hidden_states=cond, timestep_cond=guidance_embedding(guidance).to(x_t.dtype)).sample
    return F.mse_loss(eps.float(), target.float())


def distill_guidance(cfg: GuidanceDistillConfig) -> Path:
    # cpu=True without CUDA: under torchrun that makes accelerate use MULTI_CPU (gloo) data parallelism
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    model = DiffusionModel.from_pretrained(cfg.model, device=accelerator.device)
    base_fingerprint = model.fingerprint
    projection = attach_student(model.unet, cfg)
    unet = model.unet
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    lr_schedule = get_scheduler("cosine", opt, num_warmup_steps=cfg.warmup, num_training_steps=cfg.steps)
    loader = image_caption_loader(cfg.data, model.default_size, cfg.batch, cfg.seed)
    shuffle_rng = loader.generator
    unet, opt, loader = accelerator.prepare(unet, opt, loader)
    noise_scheduler = DDPMScheduler.from_config(model.scheduler_config)
    empty = model.encode_prompts([""])  # (1, T, D)

    gen = torch.Generator(device=accelerator.device).manual_seed(cfg.seed)
    progress = Progress(gen)
    accelerator.register_for_checkpointing(lr_schedule, progress)  # stepped by hand: once per optimizer step
    keep_trainable_in_checkpoints(accelerator, lambda key: "lora_" in key or "cond_proj" in key)
    if resume(accelerator, Path(cfg.work)):
        accelerator.print(f"resumed from {cfg.work} at step {progress.step}")
    bar = tqdm(total=cfg.steps, initial=progress.step, desc="guidance distillation",
               disable=not accelerator.is_main_process)
    t0 = time.time()
    stream = batches(accelerator, loader, shuffle_rng, progress)
    while progress.step < cfg.steps:
        batch = next(stream)
        with accelerator.accumulate(unet):
            with torch.no_grad():
                pixels = batch["pixel_values"].to(accelerator.device, model.vae.dtype)
                latents = model.vae.encode(pixels).latent_dist.sample(gen) * model.vae.config.scaling_factor
                captions = [c if torch.rand(1, generator=gen, device=accelerator.device).item() >= cfg.caption_dropout else ""
                            for c in batch["caption"]]
                cond = model.encode_prompts(captions)
                guidance = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(len(captions), generator=gen,
                                                                            device=accelerator.device)
            with accelerator.autocast():
                loss = distillation_step(unet, model.unet, latents, cond, empty.expand_as(cond), guidance,
                                         noise_scheduler, gen)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            lr_schedule.step()
            progress.step += 1
            progress.history.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.5f}")
            if progress.step % cfg.checkpoint_every == 0:
                checkpoint(accelerator, Path(cfg.work))
    losses = progress.history
    bar.close()
    accelerator.wait_for_everyone()
    # Every rank reports what it holds: under data parallelism the adapters must be identical.
    trained = sum(float(p.detach().double().abs().sum()) for p in accelerator.unwrap_model(unet).parameters()
                  if p.requires_grad)
    print(f"rank {accelerator.process_index}/{accelerator.num_processes} trainable checksum {trained:.10e}", flush=True)
    out = Path(cfg.out)
    if accelerator.is_main_process:
        meta = AdapterMeta(
            kind="guidance", base_fingerprint=base_fingerprint, rank=cfg.rank, alpha=float(cfg.rank),
            target_modules=cfg.target_modules, w_min=cfg.w_min, w_max=cfg.w_max, embedding_dim=EMBEDDING_DIM,
            recommended_scheduler="ddim", recommended_steps=cfg.recommended_steps,
            training={**asdict(cfg), "trainable_parameters": n_trainable, "minutes": (time.time() - t0) / 60,
                      "final_loss_mean_last_100": sum(losses[-100:]) / max(1, len(losses[-100:]))},
        )
        save_adapter(out, accelerator.unwrap_model(unet), ADAPTER_NAME, meta, projection)
        accelerator.print(f"saved guidance adapter to {out} ({n_trainable} trainable parameters)")
    return out
