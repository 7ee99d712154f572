"""distill_memory: peak memory of one guidance-distillation training step (UNet part).

Each configuration runs in its own process and reports its peak RSS (resident set size of
the whole process, model construction included; on CPU there is no allocator figure):
  shared: the product path, ONE UNet: teacher = W0 with adapters off (no_grad, nothing kept),
          student = W0 + LoRA + w projection with gradient checkpointing (distillation_step).
  copy:   baseline (a), a deep-copied teacher beside the LoRA student, otherwise identical.
  full:   baseline (b), conventional distillation: teacher copy + fully trained student, AdamW.
Toy: the embedded UNet at batch 64, 16x16 latents. SD15: random-weight SD-1.5-shaped UNet,
32x32 latent, batch 1, fp32, rank 64. SDXL (for xl_shapes; shared and copy only): random-weight SDXL UNet,
32x32 latent, batch 1, bf16 (two fp32 SDXL UNets are 20.6 GB of this 24 GiB machine; the full student's
AdamW states do not fit at all), rank 64. Text encoder and VAE are outside all three (the same for each).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import torch

from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_MODEL

CONFIGS = ("shared", "copy", "full")


def _unet(scale: str, quick: bool):
    from diffusers import UNet2DConditionModel

    from distillery.testing.sd15 import sd15_unet
    from distillery.testing.sdxl import default_dtype, sdxl_unet_config

    if scale == "sdxl":
        with default_dtype(torch.bfloat16):
            return UNet2DConditionModel(**sdxl_unet_config(narrow=quick)), 1, 8 if quick else 32, 64, 77
    if scale == "toy":
        return UNet2DConditionModel.from_pretrained(EMBEDDED_MODEL, subfolder="unet"), 64, 16, 16, 64
    unet = sd15_unet(block_out_channels=(32, 32, 64, 64)) if quick else sd15_unet()
    return unet, 1, 32, 64, 77  # batch, latent, rank, tokens


def _step(config: str, scale: str, quick: bool, rank: int | None = None) -> int:
    """One training step of `config`; returns the process's peak RSS in bytes."""
    from distillery.distill.methods.guidance import (
        GuidanceDistillConfig,
        attach_projection,
        attach_student,
        distillation_step,
    )
    from distillery.model import Conditioning
    from distillery.sampling.guidance import guidance_embedding
    from distillery.testing.sd15 import sd15_scheduler

    torch.manual_seed(0)
    unet, batch, latent, scale_rank, tokens = _unet(scale, quick)
    rank = rank or scale_rank
    unet.requires_grad_(False)
    dtype = unet.dtype
    cond, uncond = (conditioning(unet.config, batch, tokens, latent, dtype) for _ in range(2))
    x0 = torch.randn(batch, 4, latent, latent, dtype=dtype)
    w = torch.full((batch,), 2.0)
    noise_scheduler = sd15_scheduler()
    cfg = GuidanceDistillConfig(rank=rank)
    teacher = None if config == "shared" else copy.deepcopy(unet).eval()
    if config == "full":
        unet.requires_grad_(True)
        attach_projection(unet)
    else:
        attach_student(unet, cfg)
    unet.enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    if config == "shared":
        loss = distillation_step(unet, unet, x0, cond, uncond, w, noise_scheduler)
    else:  # same step, the teacher pass on the separate copy
        noise, t = torch.randn_like(x0), torch.randint(0, 1000, (batch,))
        x_t = noise_scheduler.add_noise(x0, noise, t)
        with torch.no_grad():
            eps_c, eps_u = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                   **Conditioning.cat([cond, uncond]).unet_kwargs()).sample.chunk(2)
            target = eps_c + w.view(-1, 1, 1, 1).to(dtype) * (eps_c - eps_u)
        eps = unet(x_t, t, **cond.unet_kwargs(), timestep_cond=guidance_embedding(w).to(dtype)).sample
        loss = torch.nn.functional.mse_loss(eps.float(), target.float())
    loss.backward()
    opt.step()
    return peak_rss_bytes()


def conditioning(config, batch: int, tokens: int, latent: int, dtype: torch.dtype):
    """Random text states; an SDXL-family UNet also takes pooled embeds and the image's size ids."""
    from distillery.model import Conditioning

    text = torch.randn(batch, tokens, config.cross_attention_dim, dtype=dtype)
    if config.addition_embed_type != "text_time":
        return Conditioning(text)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return Conditioning(text, torch.randn(batch, pooled, dtype=dtype)).sized(8 * latent, 8 * latent)


def peak_rss_bytes() -> int:
    """VmHWM: this process's own peak RSS. (getrusage's ru_maxrss would carry the parent's peak
    across fork + exec on Linux.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(config: str, scale: str, quick: bool, rank: int | None = None) -> int:
    """`config`'s peak RSS at `scale` (LoRA rank: the scale's, or `rank`), in a process of its own."""
    cmd = [sys.executable, "-m", "bench.distill_memory", config, scale] + (["--quick"] if quick else [])
    cmd += [f"--rank={rank}"] if rank else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_bytes"]


def _dir_bytes(folder: Path, suffix: str = ".safetensors") -> int:
    return sum(f.stat().st_size for f in folder.glob(f"*{suffix}"))


def run(quick: bool = False) -> dict:
    figures = {}
    for scale in ("toy", "sd15"):
        rss = {c: measure(c, scale, quick) for c in CONFIGS}
        figures[f"ratio_{scale}"] = rss["shared"] / rss["copy"]
        figures[f"ratio_full_{scale}"] = rss["shared"] / rss["full"]
        figures.update({f"peak_rss_{c}_{scale}_gib": rss[c] / 2**30 for c in CONFIGS})
    figures["adapter_bytes"] = _dir_bytes(EMBEDDED_ADAPTERS / "guidance-toy")
    figures["unet_bytes"] = _dir_bytes(EMBEDDED_MODEL / "unet")
    return figures


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    config, scale = sys.argv[1], sys.argv[2]
    rank = next((int(a.split("=")[1]) for a in sys.argv if a.startswith("--rank=")), None)
    print(json.dumps({"peak_rss_bytes": _step(config, scale, quick, rank)}))
