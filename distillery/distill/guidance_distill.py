"""Guidance distillation with LoRA over a shared, frozen W0.

Meng et al. 2022 (arXiv 2210.03142), stage 1: the student, given w, matches the teacher's
classifier-free-guided prediction (1 + w) eps(x_t, c) - w eps(x_t, empty) in one evaluation.
Golnari 2023 (arXiv 2312.06899): student = W0 + BA (peft LoRA), teacher = the same module
with adapters off, so there is one copy of the UNet in memory. The teacher pass runs under
no_grad (nothing kept), the student uses gradient checkpointing: activation memory stays
small next to W0.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from peft import LoraConfig
from tqdm import tqdm

from distillery.distill.data import image_caption_loader
from distillery.adapters import AdapterMeta, save_adapter
from distillery.sampling.guidance import EMBEDDING_DIM, guidance_embedding, install_projection, new_projection
from distillery.model import DiffusionModel

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


def attach_student(unet, cfg: GuidanceDistillConfig) -> torch.nn.Linear:
    """Add the LoRA adapter and the zero-initialised w projection to the (frozen) base UNet."""
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=cfg.target_modules,
                                      init_lora_weights=True), adapter_name=ADAPTER_NAME)  # B = 0: student == teacher
    projection = new_projection(unet)
    install_projection(unet, projection)
    return projection


def distillation_step(student, unet, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                      w: torch.Tensor, alphas_cumprod: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The loss of one batch: latents (B, C, h, w), cond/uncond (B, T, D), w (B,).

    `student` is the module to train through (the DDP wrapper under several processes), `unet` the
    same UNet unwrapped, whose adapters are switched off for the teacher pass.
    """
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    t = torch.randint(0, len(alphas_cumprod), (latents.shape[0],), generator=generator, device=latents.device)
    a = alphas_cumprod[t].view(-1, 1, 1, 1).to(latents.dtype)
    x_t = a.sqrt() * latents + (1 - a).sqrt() * noise  # (B, C, h, w)
    with torch.no_grad():  # teacher: W0 alone, both branches in one batch, no graph kept
        unet.disable_adapters()
        eps_c, eps_u = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=torch.cat([cond, uncond])).sample.chunk(2)
        unet.enable_adapters()
        wv = w.view(-1, 1, 1, 1).to(eps_c.dtype)
        target = eps_c + wv * (eps_c - eps_u)  # (1 + w) eps_c - w eps_u
    eps = student(x_t, t, encoder_hidden_states=cond, timestep_cond=guidance_embedding(w).to(x_t.dtype)).sample
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
    loader = image_caption_loader(cfg.data, model.default_size, cfg.batch, cfg.seed)
    unet, opt, loader = accelerator.prepare(unet, opt, loader)
    alphas = DDPMScheduler.from_config(model.scheduler_config).alphas_cumprod.to(accelerator.device)
    empty = model.encode_prompts([""])  # (1, T, D)

    work = Path(cfg.work)
    ckpt, start = work / "checkpoint.pt", 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location=accelerator.device)
        accelerator.unwrap_model(unet).load_state_dict(state["trainable"], strict=False)
        opt.load_state_dict(state["opt"])
        start = state["step"]
        accelerator.print(f"resumed from {ckpt} at step {start}")
    gen = torch.Generator(device=accelerator.device).manual_seed(cfg.seed + start)
    bar = tqdm(total=cfg.steps, initial=start, desc="guidance distillation", disable=not accelerator.is_main_process)
    step, t0, losses = start, time.time(), []
    while step < cfg.steps:
        for batch in loader:
            if step >= cfg.steps:
                break
            with accelerator.accumulate(unet):
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
                with torch.no_grad():
                    pixels = batch["pixel_values"].to(accelerator.device, model.vae.dtype)
                    latents = model.vae.encode(pixels).latent_dist.sample(gen) * model.vae.config.scaling_factor
                    captions = [c if torch.rand(1, generator=gen, device=accelerator.device).item() >= cfg.caption_dropout else ""
                                for c in batch["caption"]]
                    cond = model.encode_prompts(captions)
                    w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(len(captions), generator=gen, device=accelerator.device)
                with accelerator.autocast():
                    loss = distillation_step(unet, model.unet, latents, cond, empty.expand_as(cond), w, alphas, gen)
                accelerator.backward(loss)
                opt.step()
                opt.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                step += 1
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.5f}")
                if step % cfg.checkpoint_every == 0 and accelerator.is_main_process:
                    work.mkdir(parents=True, exist_ok=True)
                    trainable_state = {k: v for k, v in accelerator.unwrap_model(unet).state_dict().items()
                                       if "lora_" in k or "cond_proj" in k}
                    torch.save({"trainable": trainable_state, "opt": opt.state_dict(), "step": step}, ckpt.with_suffix(".tmp"))
                    ckpt.with_suffix(".tmp").replace(ckpt)
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
