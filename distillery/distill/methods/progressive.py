"""Progressive distillation of the guidance-distilled adapter: halve its DDIM steps, round by round.

Salimans & Ho 2022 (arXiv 2202.00512), applied by Meng et al. 2022 (arXiv 2210.03142, stage 2)
to the w-conditioned stage-1 student, w staying an input. A round's student, sampled with N
DDIM steps, learns what its teacher does in 2N: from z_t the teacher makes two DDIM steps
t -> t_mid -> s; the student's x prediction regresses on the x-space target

    x~ = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)

with truncated-SNR weighting max(SNR_t, 1). Teacher and student are two peft adapters (with
their own w projections) on the SAME frozen UNet, never a copy; the student starts from its
teacher. Each round writes its adapter (`<out>-<N>`), the next round's teacher; a finished
round is not run again, and a round in progress resumes from its checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from distillery.adapters import save_adapter
from distillery.adapters.files import META_FILE
from distillery.distill.training.ddim import ddim_step, eps_and_x0, require_supported_prediction
from distillery.distill.training.loop import AdapterTrainConfig, Batch, adapter_meta, make_accelerator, train_student
from distillery.distill.training.student import load_adapter_into
from distillery.model import DiffusionModel
from distillery.sampling.guidance import guidance_embedding

TEACHER, STUDENT = "teacher", "student"


@dataclass
class ProgressiveDistillConfig(AdapterTrainConfig):
    out: str = "models/adapters/progressive-toy"  # round N's adapter goes to <out>-<N>
    work: str = ".work/progressive"
    init_from: str = "models/adapters/guidance-toy"  # the first round's teacher, sampled at 2 x rounds[0] steps
    rounds: list[int] = field(default_factory=lambda: [8, 4, 2])  # the students' step counts, halving
    steps: int = 400  # per round
    batch: int = 32
    lr: float = 3e-4
    warmup: int = 20
    gradient_checkpointing: bool = False


def two_step_grid(scheduler: DDIMScheduler, student_steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, t_mid, s) per student step: the teacher's DDIM grid at 2N steps, taken two at a time (s = -1: the end)."""
    scheduler.set_timesteps(2 * student_steps)
    grid = scheduler.timesteps.long()
    return grid[0::2], grid[1::2], torch.cat([grid[2::2], torch.tensor([-1])])


def progressive_step(student, unet, batch: Batch, scheduler: DDIMScheduler, grid, projections: dict,
                     gen: torch.Generator) -> torch.Tensor:
    """The truncated-SNR-weighted x-space loss of one batch on `grid` (`two_step_grid` of `scheduler`)."""
    x0, device = batch.latents, batch.latents.device
    alphas = torch.cat([scheduler.alphas_cumprod, scheduler.final_alpha_cumprod.reshape(1)]).to(device)
    starts, mids, ends = (g.to(device) for g in grid)
    index = torch.randint(0, len(starts), (x0.shape[0],), generator=gen, device=device)
    t, t_mid, s = starts[index], mids[index], ends[index]
    a_t, a_mid, a_s = (alphas[k].view(-1, 1, 1, 1) for k in (t, t_mid, s))  # alphas[-1] is the end's alpha-bar
    noise = torch.randn(x0.shape, generator=gen, device=device, dtype=x0.dtype)
    z_t = scheduler.add_noise(x0, noise, t)
    w_emb = guidance_embedding(batch.guidance).to(x0.dtype)
    with torch.no_grad():
        kind = scheduler.config.prediction_type
        z_mid = _ddim(unet, z_t, t, a_t, a_mid, batch.cond, w_emb, projections, kind)
        z_s = _ddim(unet, z_mid, t_mid, a_mid, a_s, batch.cond, w_emb, projections, kind)
        ratio = ((1 - a_s) / (1 - a_t)).sqrt()  # sigma_s / sigma_t
        target = (z_s - ratio * z_t) / (a_s.sqrt() - ratio * a_t.sqrt())
    out = student(z_t, t, **batch.cond.unet_kwargs(), timestep_cond=w_emb).sample
    x_pred = eps_and_x0(out, z_t, a_t, kind)[1]
    weight = (a_t / (1 - a_t)).clamp(min=1.0)  # max(SNR, 1)
    return (weight * (x_pred.float() - target.float()) ** 2).mean()


def _ddim(unet, z, t, a_t, a_s, cond, w_emb, projections: dict, kind: str) -> torch.Tensor:
    """One deterministic DDIM step of the TEACHER adapter (and its w projection), then the student is back on."""
    unet.set_adapter(TEACHER)
    unet.time_embedding.cond_proj = projections[TEACHER]
    try:
        out = unet(z, t, **cond.unet_kwargs(), timestep_cond=w_emb).sample
    finally:
        unet.set_adapter(STUDENT)
        unet.time_embedding.cond_proj = projections[STUDENT]
    return ddim_step(z, out, a_t, a_s, kind)


def distill_round(cfg: ProgressiveDistillConfig, teacher: Path, student_steps: int) -> Path:
    """One halving: a student for `student_steps` from the adapter at `teacher`; returns the student's folder."""
    out = Path(f"{cfg.out}-{student_steps}")
    accelerator = make_accelerator(cfg)
    model = DiffusionModel.from_pretrained(cfg.model, device=accelerator.device)
    require_supported_prediction(model.scheduler_config, "distill-progressive")
    unet = model.unet
    teacher_meta, teacher_proj = load_adapter_into(unet, teacher, TEACHER, trainable=False)
    _, student_proj = load_adapter_into(unet, teacher, STUDENT, trainable=True)
    unet.set_adapter(STUDENT)
    projections = {TEACHER: teacher_proj, STUDENT: student_proj}
    unet.time_embedding.cond_proj = student_proj
    scheduler = DDIMScheduler.from_config(model.scheduler_config)
    grid = two_step_grid(scheduler, student_steps)
    round_cfg = replace(cfg, work=str(Path(cfg.work) / str(student_steps)), rank=teacher_meta.rank,
                        target_modules=list(teacher_meta.target_modules))

    def loss_of(trained, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        return progressive_step(trained, unet, batch, scheduler, grid, projections, gen)

    summary = train_student(accelerator, round_cfg, model, loss_of, f"progressive {2 * student_steps} -> {student_steps}",
                            is_trainable=lambda key: f".{STUDENT}." in key or "cond_proj" in key)
    if accelerator.is_main_process:
        summary = {"teacher": str(teacher), "teacher_steps": 2 * student_steps, **summary}
        meta = adapter_meta("progressive", round_cfg, model.fingerprint, summary, recommended_scheduler="ddim",
                            recommended_steps=student_steps, schedulers=["ddim"], steps=[student_steps])
        save_adapter(out, unet, STUDENT, meta, student_proj)
        accelerator.print(f"saved the {student_steps}-step progressive adapter to {out}")
    accelerator.wait_for_everyone()
    return out


def distill_progressive(cfg: ProgressiveDistillConfig) -> Path:
    teacher = Path(cfg.init_from)
    for student_steps in cfg.rounds:
        done = Path(f"{cfg.out}-{student_steps}")
        teacher = done if (done / META_FILE).exists() else distill_round(cfg, teacher, student_steps)
    return teacher
