"""Latent consistency distillation into a LoRA over the shared W0, with w kept as an input.

LCM-LoRA (Luo et al. 2023, arXiv 2311.05556), as in diffusers' `train_lcm_distill_lora_sdxl.py`:
the teacher is the same UNet with the adapters off, making ONE classifier-free-guided DDIM
step over N skipped timesteps (start_t -> start_t - T/N); the student maps x at start_t, the
target (the student itself under no_grad, no EMA for the LoRA variant) maps the teacher's
x_prev, both through the boundary scalings c_skip / c_out; Huber loss. Beyond LCM-LoRA, which
bakes one guidance scale in, w reaches the student through the same `cond_proj` path the
guidance adapter uses (as the full-model LCM does), so one adapter serves any w in its range.
The student starts from the guidance-distilled adapter: it already is a w-conditioned guided
eps model, and consistency training only has to make it jump.
Sampled with diffusers' `LCMScheduler` (original_inference_steps = N, timestep_scaling = s).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from distillery.adapters import save_adapter
from distillery.distill.methods.guidance import attach_student, cfg_teacher_eps
from distillery.distill.training.ddim import ddim_step, eps_and_x0, require_supported_prediction
from distillery.distill.training.loop import AdapterTrainConfig, Batch, adapter_meta, make_accelerator, train_student
from distillery.distill.training.student import start_from
from distillery.model import DiffusionModel
from distillery.sampling.guidance import guidance_embedding

ADAPTER_NAME = "consistency"
SIGMA_DATA = 0.5


@dataclass
class ConsistencyDistillConfig(AdapterTrainConfig):
    out: str = "models/adapters/lcm-toy"
    work: str = ".work/consistency"
    steps: int = 1500
    lr: float = 3e-4
    init_from: str = "models/adapters/guidance-toy"  # "" -> a fresh LoRA on `target_modules`
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                                               "ff.net.2", "time_emb_proj", "linear_1", "linear_2"])
    num_ddim_timesteps: int = 50  # N: the teacher's solver grid, LCMScheduler's original_inference_steps
    timestep_scaling: float = 10.0
    huber_c: float = 0.001
    max_steps: int = 8  # the step counts served: 1..max_steps
    recommended_steps: int = 4


def sampling_recipe(cfg: ConsistencyDistillConfig) -> dict:
    """How a consistency adapter trained with `cfg` is sampled: the AdapterMeta fields its adapter.json carries."""
    return {"recommended_scheduler": "lcm", "recommended_steps": cfg.recommended_steps, "schedulers": ["lcm"],
            "steps": list(range(1, cfg.max_steps + 1)),
            "scheduler_config": {"original_inference_steps": cfg.num_ddim_timesteps,
                                 "timestep_scaling": cfg.timestep_scaling}}


def boundary_scalings(t: torch.Tensor, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip, c_out at timesteps t (B,), as LCMScheduler computes them: (B, 1, 1, 1) each."""
    scaled = (t.float() * timestep_scaling).view(-1, 1, 1, 1)
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def consistency_step(student, unet, batch: Batch, noise_scheduler: DDPMScheduler, cfg: ConsistencyDistillConfig,
                     gen: torch.Generator) -> torch.Tensor:
    """The Huber consistency loss of one batch (`unet` = `student` unwrapped)."""
    x0, device = batch.latents, batch.latents.device
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    skip = alphas_cumprod.shape[0] // cfg.num_ddim_timesteps
    index = torch.randint(0, cfg.num_ddim_timesteps, (x0.shape[0],), generator=gen, device=device)
    start_t = (index + 1) * skip - 1  # the solver grid 19, 39, ..., 999 for T = 1000, N = 50
    t = (start_t - skip).clamp(min=0)
    noise = torch.randn(x0.shape, generator=gen, device=device, dtype=x0.dtype)
    a_start, a_t = alphas_cumprod[start_t], alphas_cumprod[t]
    x_start = noise_scheduler.add_noise(x0, noise, start_t)
    w_emb = guidance_embedding(batch.guidance).to(x0.dtype)
    c_skip_start, c_out_start = boundary_scalings(start_t, cfg.timestep_scaling)
    c_skip, c_out = boundary_scalings(t, cfg.timestep_scaling)

    kind = noise_scheduler.config.prediction_type  # eps or v: CFG's combination is linear in either
    out = student(x_start, start_t, **batch.cond.unet_kwargs(), timestep_cond=w_emb).sample
    prediction = c_skip_start * x_start + c_out_start * eps_and_x0(out, x_start, a_start, kind)[1]
    with torch.no_grad():
        out_teacher = cfg_teacher_eps(unet, x_start, start_t, batch.cond, batch.uncond, batch.guidance)
        x_prev = ddim_step(x_start, out_teacher, a_start, a_t, kind)
        out_target = unet(x_prev, t, **batch.cond.unet_kwargs(), timestep_cond=w_emb).sample
        target = c_skip * x_prev + c_out * eps_and_x0(out_target, x_prev, a_t, kind)[1]
    diff = prediction.float() - target.float()
    return (torch.sqrt(diff**2 + cfg.huber_c**2) - cfg.huber_c).mean()


def distill_consistency(cfg: ConsistencyDistillConfig) -> Path:
    accelerator = make_accelerator(cfg)
    model = DiffusionModel.from_pretrained(cfg.model, device=accelerator.device)
    require_supported_prediction(model.scheduler_config, "distill-consistency")
    base_fingerprint = model.fingerprint
    unet = model.unet
    if cfg.init_from:
        projection = start_from(unet, Path(cfg.init_from), ADAPTER_NAME, cfg)
    else:
        projection = attach_student(unet, cfg, ADAPTER_NAME)
    noise_scheduler = DDPMScheduler.from_config(model.scheduler_config)

    def loss_of(student, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        return consistency_step(student, unet, batch, noise_scheduler, cfg, gen)

    summary = train_student(accelerator, cfg, model, loss_of, "consistency distillation")
    out = Path(cfg.out)
    if accelerator.is_main_process:
        meta = adapter_meta("consistency", cfg, base_fingerprint, summary, **sampling_recipe(cfg))
        save_adapter(out, unet, ADAPTER_NAME, meta, projection)
        accelerator.print(f"saved consistency adapter to {out} ({summary['trainable_parameters']} trainable parameters)")
    return out
