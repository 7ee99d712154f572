"""prune: what block pruning saves and costs, per level, and every lever at once.

Per level (suffix _l1, _l2; the recipes in distillery/distill/methods/pruned_unet.py `level_spec`), on the toy:
params_ratio = pruned / full UNet parameters; latency_ratio = one UNet evaluation (batch 1; _b2:
the CFG batch of 2), interleaved medians; alignment_gap = align(full) - align(pruned) and fid_ratio
= FID(pruned) / FID(full), both at 25-step CFG at the model's default w, the same prompts and seeds
(FID with the oracle's features, distillery/distill/evaluation/fid.py). On the random-weight SD-1.5-shaped
UNet (64x64 latents), the same recipe: params_ratio_sd15_l*, latency_ratio_sd15_l*.

Every lever at once, whole images (text encoding + denoising + decoding), interleaved in one run:
the level-2 base with its 4-step consistency adapter (single evaluation per step at w) vs the full
base at 25-step CFG. speedup_all = images per second, ratio; speedup_all_limit = the same ratio from
the run's component timings (text, decoding, and the UNet calls timed for the latency ratios: each
base without the adapter);
alignment_gap_all and fid_ratio_all as above.
"""

from __future__ import annotations

import torch

from bench.common import interleaved_medians
from bench.references import eval_images, fid_reference
from distillery.adapters import AdapterRegistry
from distillery.distill.evaluation.alignment import alignment_of
from distillery.distill.methods.prune_spec import level_spec
from distillery.distill.methods.pruned_unet import parameter_count, prune_unet
from distillery.model import Conditioning, DiffusionModel
from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_MODEL, MODELS_DIR
from distillery.sampling.pipeline import generate
from distillery.testing.sd15 import sd15_unet

PRUNED_MODEL = "toy-pruned-l{}"  # the shipped pruned bases, one per level
ALL_LEVERS_LEVEL = 2
ALL_LEVERS_ADAPTER = "lcm-toy-pruned-l2"  # consistency-distilled on the level-2 base
PROMPT = "a small blue triangle on a yellow background"
TEACHER_STEPS, STUDENT_STEPS = 25, 4


def unet_latency(unets: dict[str, torch.nn.Module], conditioning: Conditioning, size: int,
                 rounds: int) -> dict[str, float]:
    """Median seconds of one evaluation of each UNet on the same input (a batch of `conditioning`'s rows),
    interleaved."""
    x = torch.randn(conditioning.rows, 4, size, size, generator=torch.Generator().manual_seed(0))
    t = torch.full((conditioning.rows,), 500)

    def call(unet):
        with torch.no_grad():
            unet(x, t, **conditioning.unet_kwargs())

    return interleaved_medians({k: (lambda u=u: call(u)) for k, u in unets.items()}, rounds)


def random_text(batch: int, text_dim: int) -> Conditioning:
    return Conditioning(torch.randn(batch, 77, text_dim, generator=torch.Generator().manual_seed(0)))


def quality(figures: dict, reference, model, key: str, n: int, w: float, steps: int, adapters=(), registry=None):
    """align_<key> and fid_<key> of `n` judged images at `steps` and `w` (the shared prompts and seeds)."""
    images, prompts = eval_images(model, n, guidance=w, steps=steps, batch=250, adapters=adapters, registry=registry)
    figures[f"align_{key}"], figures[f"fid_{key}"] = alignment_of(images, prompts), reference.fid(images)
    return images


def every_lever_speed(base, small, registry, levers, w: float, rounds: int, full_b2: float, small_b1: float,
                      base_levers=(), base_registry=None) -> dict:
    """Whole images, interleaved: the full base's CFG teacher (with `base_levers`, e.g. the same style) at
    TEACHER_STEPS against the small base with `levers` (a few-step adapter among them) at STUDENT_STEPS;
    speedup_all_limit from the components: text, decoding and the UNet calls timed already."""
    whole = interleaved_medians({
        "full": lambda: generate(base, [PROMPT], [0], w, TEACHER_STEPS, adapters=base_levers, registry=base_registry),
        "all": lambda: generate(small, [PROMPT], [0], w, STUDENT_STEPS, adapters=levers, registry=registry),
    }, rounds)
    size = base.default_size
    latents = torch.zeros(1, *base.latent_shape(size, size))
    parts = interleaved_medians({
        "text_1": lambda: base.encode_prompts([PROMPT]), "text_2": lambda: base.encode_prompts([PROMPT, None]),
        "decode": lambda: base.decode(latents),
    }, rounds * 3)
    full_image = parts["text_2"] + TEACHER_STEPS * full_b2 + parts["decode"]
    small_image = parts["text_1"] + STUDENT_STEPS * small_b1 + parts["decode"]
    return {"full_image_ms": whole["full"] * 1e3, "all_image_ms": whole["all"] * 1e3,
            "speedup_all": whole["full"] / whole["all"], "speedup_all_limit": full_image / small_image}


def run(quick: bool = False) -> dict:
    base = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    pruned = {level: DiffusionModel.from_pretrained(MODELS_DIR / PRUNED_MODEL.format(level)) for level in (1, 2)}
    n, rounds = (32, 3) if quick else (1000, 30)
    w = float(base.defaults.get("guidance", 1.0))
    reference, floor = fid_reference(n)  # shared with steps_quality, as the full base's renders (bench/references.py)
    figures = {"images": n, "guidance": w, "fid_real": floor}

    quality(figures, reference, base, "full", n, w, TEACHER_STEPS)
    size, text_dim = base.unet.config.sample_size, base.unet.config.cross_attention_dim
    calls = {}  # (level, batch) -> median seconds of one call of the full and the pruned UNet
    for level, model in pruned.items():
        figures[f"params_ratio_l{level}"] = parameter_count(model.unet) / parameter_count(base.unet)
        for batch, suffix in ((1, ""), (2, "_b2")):
            t = calls[level, batch] = unet_latency({"full": base.unet, "pruned": model.unet},
                                                   random_text(batch, text_dim), size, rounds * 10)
            figures[f"latency_ratio{suffix}_l{level}"] = t["pruned"] / t["full"]
        quality(figures, reference, model, f"l{level}", n, w, TEACHER_STEPS)
        figures[f"alignment_gap_l{level}"] = figures["align_full"] - figures[f"align_l{level}"]
        figures[f"fid_ratio_l{level}"] = figures[f"fid_l{level}"] / figures["fid_full"]

    torch.manual_seed(0)
    sd = (sd15_unet(block_out_channels=(32, 32, 64, 64), sample_size=16) if quick else sd15_unet()).eval()
    unets = {"full": sd, **{f"l{level}": prune_unet(sd, level_spec(sd.config, level))[0] for level in (1, 2)}}
    t = unet_latency(unets, random_text(1, sd.config.cross_attention_dim), sd.config.sample_size, 2 if quick else 5)
    for level in (1, 2):
        figures[f"params_ratio_sd15_l{level}"] = parameter_count(unets[f"l{level}"]) / parameter_count(sd)
        figures[f"latency_ratio_sd15_l{level}"] = t[f"l{level}"] / t["full"]
    figures["sd15_unet_ms"] = t["full"] * 1e3
    del unets, sd

    small = pruned[ALL_LEVERS_LEVEL]
    registry = AdapterRegistry(small)  # serving the pruned base: its serving layers installed
    levers = ((registry.load(ALL_LEVERS_ADAPTER, EMBEDDED_ADAPTERS / ALL_LEVERS_ADAPTER), 1.0),)
    figures.update(every_lever_speed(base, small, registry, levers, w, rounds, calls[ALL_LEVERS_LEVEL, 2]["full"],
                                     calls[ALL_LEVERS_LEVEL, 1]["pruned"]))
    quality(figures, reference, small, "all", n, w, STUDENT_STEPS, adapters=levers, registry=registry)
    figures["alignment_gap_all"] = figures["align_full"] - figures["align_all"]
    figures["fid_ratio_all"] = figures["fid_all"] / figures["fid_full"]
    return figures
