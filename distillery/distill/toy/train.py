"""Train the embedded toy text-to-image model from scratch, on CPU.

Two stages, each resumable from its checkpoint under --work (distill/training/checkpoints.py):
  vae:  AutoencoderKL on toy images (reconstruction + small KL), then the latent
        scaling factor is set from the data (SD's 0.18215 is the same idea).
  unet: UNet2DConditionModel + CLIP text encoder, epsilon prediction on cached VAE
        latents with Min-SNR-5 weighting, 15% caption dropout (empty prompt) so
        classifier-free guidance works, EMA weight averaging, alignment tracked by the
        oracle during training.
The final EMA weights are written as a diffusers folder (StableDiffusionPipeline layout).
`--family xl` trains the SDXL-architecture toy instead (architecture.build_xl_*: two text
encoders, pooled embeds, size ids) and writes the StableDiffusionXLPipeline layout; its
dropped captions are zeros, as SDXL's (its pipeline's force_zeros_for_empty_prompt).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from tqdm import tqdm

from distillery.atomic import atomic_folder
from distillery.distill.toy import architecture
from distillery.distill.toy.arrays import to_model_range, toy_arrays
from distillery.distill.toy.data import IMAGE_SIZE
from distillery.distill.training.checkpoints import Progress, checkpoint, resume
from distillery.model import DiffusionModel, encode_token_ids

FAMILIES = ("sd", "xl")  # the SD 1.x component set (models/toy), SDXL's (models/toy-xl)


@dataclass
class ToyTrainConfig:
    work: str = ".work/toy"
    out: str = "models/toy"
    family: str = "sd"  # one of FAMILIES
    vae_from: str = ""  # a trained toy VAE folder to reuse (the VAE is the same for every family), else trained
    n_images: int = 60_000
    vae_steps: int = 800
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_kl: float = 1e-5
    unet_steps: int = 9000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup: int = 500
    snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023, arXiv 2303.09556); 0 disables
    caption_dropout: float = 0.15
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    eval_every: int = 1500
    eval_prompts: int = 96  # oracle alignment tracked on this many prompts, at w = 0 and w = 2
    eval_steps: int = 20
    seed: int = 0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {list(FAMILIES)}, got {self.family!r}")


def train_vae(cfg: ToyTrainConfig) -> AutoencoderKL:
    work = Path(cfg.work)
    final = work / "vae"
    if (final / "config.json").exists():
        return AutoencoderKL.from_pretrained(final)
    if cfg.vae_from:
        return AutoencoderKL.from_pretrained(cfg.vae_from)
    torch.manual_seed(cfg.seed)
    data = toy_arrays(cfg.n_images, work)
    accelerator = Accelerator()
    vae = architecture.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    schedule = get_scheduler("cosine", opt, num_warmup_steps=0, num_training_steps=cfg.vae_steps)
    vae, opt = accelerator.prepare(vae, opt)
    progress = Progress(torch.Generator().manual_seed(cfg.seed))  # draws the batches: the data position
    accelerator.register_for_checkpointing(schedule, progress)
    resume(accelerator, work / "vae_run")
    vae.train()
    bar = tqdm(total=cfg.vae_steps, desc="vae", initial=progress.step)
    while progress.step < cfg.vae_steps:
        idx = torch.randint(0, cfg.n_images, (cfg.vae_batch,), generator=progress.generator)
        x = torch.from_numpy(to_model_range(data["images"][idx.numpy()]))
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(progress.generator)).sample
        rec = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + cfg.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        opt.step()
        schedule.step()
        progress.step += 1
        bar.update(1)
        bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.2f}")
        if progress.step % cfg.checkpoint_every == 0:
            checkpoint(accelerator, work / "vae_run", progress.step)
    vae = accelerator.unwrap_model(vae).eval()
    with torch.no_grad():  # unit-variance latents, as SD's scaling factor gives
        x = torch.from_numpy(to_model_range(data["images"][:2048]))
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    with atomic_folder(final) as staging:  # its config.json is what a rerun takes for "the VAE is trained"
        vae.save_pretrained(staging)
    print(f"vae: scaling_factor {1.0 / std:.4f}")
    return vae


@torch.no_grad()
def _encode_dataset(vae: AutoencoderKL, tokenizer, data: dict, batch: int = 512):
    means, stds = [], []
    for i in tqdm(range(0, len(data["images"]), batch), desc="encoding latents", mininterval=2):
        dist = vae.encode(torch.from_numpy(to_model_range(data["images"][i : i + batch]))).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    ids = tokenizer(list(data["captions"]), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return torch.cat(means), torch.cat(stds), ids  # (N, 4, 16, 16) x2, (N, T)


def train_unet(cfg: ToyTrainConfig, vae: AutoencoderKL) -> None:
    from distillery.distill.evaluation.alignment import alignment  # the oracle is only needed for tracking

    work = Path(cfg.work)
    accelerator = Accelerator()
    torch.manual_seed(cfg.seed)
    tokenizer = architecture.build_tokenizer()
    xl = cfg.family == "xl"
    if xl:
        text_encoder, text_encoder_2 = architecture.build_xl_text_encoders(len(tokenizer))
        unet, encoders = architecture.build_xl_unet(), {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    else:
        text_encoder, text_encoder_2 = architecture.build_text_encoder(len(tokenizer)), None
        unet, encoders = architecture.build_unet(), {"text_encoder": text_encoder}
    scheduler = architecture.build_scheduler()
    trained = torch.nn.ModuleDict({"unet": unet, **encoders})
    ema = EMAModel(trained.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4)
    opt = torch.optim.AdamW(trained.parameters(), lr=cfg.unet_lr, weight_decay=1e-2)
    schedule = get_scheduler("cosine", opt, num_warmup_steps=cfg.warmup, num_training_steps=cfg.unet_steps)
    trained, opt = accelerator.prepare(trained, opt)
    progress = Progress(torch.Generator().manual_seed(cfg.seed))  # batches, noise, timesteps, caption dropout
    accelerator.register_for_checkpointing(schedule, ema, progress)

    data = toy_arrays(cfg.n_images, work)
    means, stds, ids = _encode_dataset(vae, tokenizer, data)
    empty_ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    sf = vae.config.scaling_factor
    resume(accelerator, work / "unet_run")
    bar = tqdm(total=cfg.unet_steps, desc="unet", initial=progress.step)
    t0 = time.time()
    while progress.step < cfg.unet_steps:
        gen = progress.generator
        idx = torch.randint(0, len(means), (cfg.unet_batch,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * sf  # (B, 4, 16, 16)
        batch_ids = ids[idx].clone()
        dropped = torch.rand(cfg.unet_batch, generator=gen) < cfg.caption_dropout
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        model = accelerator.unwrap_model(trained)
        if xl:  # both encoders read the same ids (one tokenizer); dropped captions are zeros
            cond = encode_token_ids(model["text_encoder"], batch_ids, model["text_encoder_2"], batch_ids)
            cond = cond.kept(~dropped).sized(IMAGE_SIZE, IMAGE_SIZE)
        else:  # dropped captions are the empty prompt
            batch_ids[dropped] = empty_ids
            cond = encode_token_ids(model["text_encoder"], batch_ids)
        pred = model["unet"](noisy, t, **cond.unet_kwargs()).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if cfg.snr_gamma > 0:  # down-weight the easy low-noise steps: shapes are decided at high noise
            snr = compute_snr(scheduler, t)
            per_sample = per_sample * torch.clamp(snr, max=cfg.snr_gamma) / snr
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trained.parameters(), 1.0)
        opt.step()
        schedule.step()
        ema.step(trained.parameters())
        progress.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{schedule.get_last_lr()[0]:.1e}")
        done = progress.step
        if done % cfg.eval_every == 0 or done == cfg.unet_steps:
            ema.store(trained.parameters())
            ema.copy_to(trained.parameters())
            trained.eval()
            model = DiffusionModel(unet, vae, text_encoder, tokenizer, dict(scheduler.config), {},
                                   text_encoder_2=text_encoder_2, tokenizer_2=tokenizer if xl else None,
                                   zero_unconditional=xl)
            scores = {f"w{guidance:g}": alignment(model, n=cfg.eval_prompts, guidance=guidance, steps=cfg.eval_steps,
                                           batch=min(48, cfg.eval_prompts)) for guidance in (0.0, 2.0)}
            trained.train()
            ema.restore(trained.parameters())
            progress.history.append({"step": done, "loss": loss.item(), "minutes": (time.time() - t0) / 60, **scores})
            tqdm.write(f"step {done}: alignment {scores}")
        if done % cfg.checkpoint_every == 0 or done == cfg.unet_steps:
            checkpoint(accelerator, work / "unet_run", progress.step)

    ema.copy_to(trained.parameters())
    out = Path(cfg.out)
    with atomic_folder(out) as staging:  # replaced whole: a server never loads half a model
        _pipeline(vae, unet, scheduler, tokenizer, **encoders).save_pretrained(staging)
        for folder in ("tokenizer", "tokenizer_2") if xl else ("tokenizer",):
            architecture.save_tokenizer(tokenizer, staging / folder)
        (staging / "training.json").write_text(json.dumps({"config": asdict(cfg), "history": progress.history},
                                                          indent=1))
    print(f"saved toy model to {out}")


def _pipeline(vae, unet, scheduler, tokenizer, text_encoder, text_encoder_2=None):
    """The family's stock pipeline, for its folder layout (SDXL: both encoders read the one toy tokenizer)."""
    if text_encoder_2 is not None:
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def train_toy(cfg: ToyTrainConfig) -> None:
    vae = train_vae(cfg)
    vae.eval().requires_grad_(False)
    train_unet(cfg, vae)
