"""The loop every distiller shares: a student UNet's trainable parameters trained on a loss, resumable.

An adapter distiller makes an accelerator (`make_accelerator`), loads the model on its device,
attaches its student (and teachers: other adapters on the SAME UNet, never a copy), then hands
`train_student` a loss over `Batch`es; W0 stays frozen. The pruning distiller hands it the pruned
UNet, every parameter trainable, with the unpruned teacher beside it. The loop owns the data (latents from the VAE, captions
with dropout, w drawn per sample), the optimizer and cosine schedule, accelerate checkpoints
of the trainable tensors and the data position, and the per-rank checksum printed at the end.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm import tqdm

from distillery.adapters import W_CONDITIONED, AdapterMeta
from distillery.distill.training.checkpoints import Progress, batches, checkpoint, keep_trainable_in_checkpoints, resume
from distillery.distill.training.image_captions import image_caption_loader
from distillery.model import Conditioning, DiffusionModel
from distillery.sampling.guidance import EMBEDDING_DIM


@dataclass
class TrainConfig:
    """What every distiller takes; each adds its own fields."""

    model: str = "models/toy"
    data: str = "toy"  # "toy", "toy-stripes" (the style's data) or an imagefolder with metadata.jsonl
    out: str = "models/adapters/adapter"
    work: str = ".work/adapter"
    steps: int = 1000
    batch: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 100
    caption_dropout: float = 0.1  # the student must also handle the empty prompt
    mixed_precision: str = "no"  # "fp16" / "bf16" on GPUs
    gradient_checkpointing: bool = True
    checkpoint_every: int = 200
    seed: int = 0


@dataclass
class AdapterTrainConfig(TrainConfig):
    """What every adapter distiller takes."""

    rank: int = 16
    target_modules: list[str] = field(default_factory=list)
    w_min: float = 0.0
    w_max: float = 5.0


@dataclass
class Batch:
    latents: torch.Tensor  # (B, C, h, w), scaled by the VAE's scaling factor
    cond: Conditioning  # B rows: the captions after dropout, at the training size
    uncond: Conditioning  # B rows: the unconditional branch (the family's: the empty prompt, or zeros)
    guidance: torch.Tensor  # (B,) w ~ U[w_min, w_max] (0 without a w range)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    # cpu=True without CUDA: under torchrun that makes accelerate use MULTI_CPU (gloo) data parallelism
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    return accelerator


def train_student(accelerator: Accelerator, cfg: TrainConfig, model: DiffusionModel,
                  loss_of: Callable[[torch.nn.Module, Batch, torch.Generator], torch.Tensor], desc: str,
                  is_trainable: Callable[[str], bool] = lambda key: "lora_" in key or "cond_proj" in key) -> dict:
    """Train `model.unet`'s parameters that require grad on `loss_of(trained_module, batch, generator)` for
    `cfg.steps` optimizer steps (resuming from `cfg.work`); returns the run's summary for the student's metadata.
    `trained_module` is the module to call for gradients (the DDP wrapper under several processes)."""
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
    trained, opt, loader = accelerator.prepare(unet, opt, loader)
    size = model.default_size
    empty = model.encode_prompts([None]).sized(size, size)  # one row

    gen = torch.Generator(device=accelerator.device).manual_seed(cfg.seed)
    progress = Progress(gen)
    accelerator.register_for_checkpointing(lr_schedule, progress)  # stepped by hand: once per optimizer step
    keep_trainable_in_checkpoints(accelerator, is_trainable)
    if resume(accelerator, Path(cfg.work)):
        accelerator.print(f"resumed from {cfg.work} at step {progress.step}")
    bar = tqdm(total=cfg.steps, initial=progress.step, desc=desc, disable=not accelerator.is_main_process)
    t0 = time.time()
    stream = batches(accelerator, loader, shuffle_rng, progress)
    while progress.step < cfg.steps:
        raw = next(stream)
        with accelerator.accumulate(trained):
            with torch.no_grad():
                batch = _batch(model, raw, empty, cfg, gen, accelerator.device)
            with accelerator.autocast():
                loss = loss_of(trained, batch, gen)
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
                checkpoint(accelerator, Path(cfg.work), progress.step)
    bar.close()
    accelerator.wait_for_everyone()
    # Every rank reports what it holds: under data parallelism the adapters must be identical.
    checksum = sum(float(p.detach().double().abs().sum()) for p in trainable)
    print(f"rank {accelerator.process_index}/{accelerator.num_processes} trainable checksum {checksum:.10e}", flush=True)
    last = progress.history[-100:]
    return {"trainable_parameters": n_trainable, "minutes": (time.time() - t0) / 60,
            "final_loss_mean_last_100": sum(last) / max(1, len(last))}


def _batch(model: DiffusionModel, raw: dict, empty: Conditioning, cfg: TrainConfig, gen: torch.Generator,
           device) -> Batch:
    pixels = raw["pixel_values"].to(device, model.vae.dtype)
    latents = model.vae.encode(pixels).latent_dist.sample(gen) * model.vae.config.scaling_factor
    captions = [c if torch.rand(1, generator=gen, device=device).item() >= cfg.caption_dropout else ""
                for c in raw["caption"]]
    cond = model.encode_prompts(captions).sized(*pixels.shape[-2:])
    w_min, w_max = getattr(cfg, "w_min", 0.0), getattr(cfg, "w_max", 0.0)  # only adapters take w
    guidance = w_min + (w_max - w_min) * torch.rand(len(captions), generator=gen, device=device)
    return Batch(latents, cond, empty.repeat(cond.rows), guidance)


def adapter_meta(kind: str, cfg: AdapterTrainConfig, base_fingerprint: str, summary: dict, **sampling) -> AdapterMeta:
    """The metadata of an adapter trained with `cfg` (its run recorded under "training"); `sampling`: the
    recommended / allowed schedulers and steps."""
    w = {"w_min": cfg.w_min, "w_max": cfg.w_max, "embedding_dim": EMBEDDING_DIM} if kind in W_CONDITIONED else {}
    return AdapterMeta(kind=kind, base_fingerprint=base_fingerprint, rank=cfg.rank, alpha=float(cfg.rank),
                       target_modules=list(cfg.target_modules), training={**asdict(cfg), **summary}, **w, **sampling)
