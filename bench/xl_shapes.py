"""xl_shapes: SDXL and SSD-1B at their real sizes, random weights built from the published configs
(distillery/testing/sdxl.py; nothing downloaded). Each part runs in a process of its own, so each peak
RSS is its own:

  calls:   parameters of SDXL's UNet, its two text encoders and VAE; SSD-1B's UNet (level 3 of SDXL's
           config, initialised from it as the pruner does); one UNet call each at a 64x64 latent (512 px),
           batch 1, interleaved; params_ratio and latency_ratio SSD-1B / SDXL.
  load:    a random SDXL folder written in fp16 by stock StableDiffusionXLPipeline, loaded by distillery's
           one loader (bf16), then one whole 2-step CFG image at 512 px through `generate`.
  memory:  bench/distill_memory.py's guidance-distillation step at SDXL scale: shared W0 (adapters off for
           the teacher) against a deep-copied teacher, peak RSS each, with LoRA rank 64 (LCM-LoRA SDXL's:
           distill_memory_ratio_sdxl) and 16 (distillery's adapters': distill_memory_ratio_sdxl_r16). The LoRA,
           its gradients and AdamW states are part of both configurations' peak.

Precision bf16 throughout: two fp32 SDXL UNets (20.6 GB) do not fit beside anything on this 24 GiB machine,
and this CPU's bf16 matmuls (AVX512-BF16) are faster than fp32 (fp16 runs an order of magnitude slower
there). 1024 px is not timed: 4x the latent pixels of a 512-px call (seconds each on 2 cores). `--quick`: the same
structure at toy widths (narrow=True), 8x8 latents.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import interleaved_medians
from bench.distill_memory import conditioning, measure
from distillery.distill.methods.pruned_unet import parameter_count

PARTS = ("calls", "load")


def _calls(quick: bool) -> dict:
    from diffusers import UNet2DConditionModel

    from distillery.distill.methods.prune_spec import level_spec
    from distillery.distill.methods.pruned_unet import prune_unet
    from distillery.testing.sdxl import default_dtype, sdxl_text_encoders, sdxl_unet_config, sdxl_vae

    torch.manual_seed(0)
    with default_dtype(torch.bfloat16):
        encoders, vae = sdxl_text_encoders(quick), sdxl_vae(quick)
        figures = {"text_encoder_params": parameter_count(encoders[0]),
                   "text_encoder_2_params": parameter_count(encoders[1]), "vae_params": parameter_count(vae)}
        del encoders, vae
        sdxl = UNet2DConditionModel(**sdxl_unet_config(quick)).eval()
    ssd1b, _ = prune_unet(sdxl, level_spec(sdxl.config, 3))
    latent = 8 if quick else 64
    cond = conditioning(sdxl.config, 1, 77, latent, torch.bfloat16)
    x, t = torch.randn(1, 4, latent, latent, dtype=torch.bfloat16), torch.tensor([500])
    with torch.no_grad():
        times = interleaved_medians({"sdxl": lambda: sdxl(x, t, **cond.unet_kwargs()),
                                     "ssd1b": lambda: ssd1b(x, t, **cond.unet_kwargs())}, rounds=2 if quick else 5)
    figures.update({
        "unet_params_sdxl": parameter_count(sdxl), "unet_params_ssd1b": parameter_count(ssd1b),
        "params_ratio_ssd1b": parameter_count(ssd1b) / parameter_count(sdxl), "latent": latent,
        "unet_call_ms_sdxl": times["sdxl"] * 1e3, "unet_call_ms_ssd1b": times["ssd1b"] * 1e3,
        "latency_ratio_ssd1b": times["ssd1b"] / times["sdxl"],
    })
    return figures


def _load(quick: bool) -> dict:
    from distillery.distill.toy.architecture import build_tokenizer
    from distillery.model import DiffusionModel
    from distillery.sampling.pipeline import generate
    from distillery.testing.sdxl import save_sdxl_folder

    with tempfile.TemporaryDirectory(dir=".bench") as folder:
        t0 = time.perf_counter()
        save_sdxl_folder(Path(folder), build_tokenizer(), narrow=quick)
        written = time.perf_counter() - t0
        folder_bytes = sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors"))
        t0 = time.perf_counter()
        model = DiffusionModel.from_pretrained(folder, dtype=torch.bfloat16)
        loaded = time.perf_counter() - t0
        size = 64 if quick else 512
        t0 = time.perf_counter()
        out = generate(model, ["a red circle"], [0], 5.0, 2, height=size, width=size)
        image = time.perf_counter() - t0
    assert model.family == "sdxl" and out.images[0].size == (size, size), (model.family, out.images[0].size)
    return {"folder_gb": folder_bytes / 1e9, "write_s": written, "load_s": loaded,
            "image_px": size, "image_2_steps_cfg_s": image, "unet_evaluations": out.unet_evaluations}


def _part(name: str, quick: bool) -> dict:
    """`name` in a process of its own: its figures and its peak RSS."""
    cmd = [sys.executable, "-m", "bench.xl_shapes", name] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    Path(".bench").mkdir(exist_ok=True)
    figures = {}
    for name in PARTS:
        figures.update({f"{name}_{k}" if k == "peak_rss_gib" else k: v for k, v in _part(name, quick).items()})
    ranks = ((64, ""), (16, "_r16"))  # LCM-LoRA SDXL's rank; the rank distillery's adapters train
    for rank, suffix in ranks[:1] if quick else ranks:
        rss = {config: measure(config, "sdxl", quick, rank) for config in ("shared", "copy")}
        figures.update({f"distill_peak_rss_shared{suffix}_gib": rss["shared"] / 2**30,
                        f"distill_peak_rss_copy{suffix}_gib": rss["copy"] / 2**30,
                        f"distill_memory_ratio_sdxl{suffix}": rss["shared"] / rss["copy"]})
    return figures


if __name__ == "__main__":
    from bench.distill_memory import peak_rss_bytes

    part, quick = sys.argv[1], "--quick" in sys.argv
    result = {"calls": _calls, "load": _load}[part](quick)
    print(json.dumps({**result, "peak_rss_gib": peak_rss_bytes() / 2**30}))
