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
from distillery.model import DiffusionModel
from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_MODEL, MODELS_DIR
from distillery.sampling.pipeline import generate
from distillery.testing.sd15 import sd15_unet

PRUNED_MODEL = "toy-pruned-l{}"  # the shipped pruned bases, one per level
ALL_LEVERS_LEVEL = 2
ALL_LEVERS_ADAPTER = "lcm-toy-pruned-l2"  # consistency-distilled on the level-2 base
PROMPT = "a small blue triangle on a yellow background"
TEACHER_STEPS, STUDENT_STEPS = 25, 4


def unet_latency(unets: dict[str, torch.nn.Module], batch: int, size: int, text_dim: int, rounds: int) -> dict[str, float]:
    """Median seconds of one evaluation of each UNet on the same input, interleaved."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, size, size, generator=g)
    text = torch.randn(batch, 77, text_dim, generator=g)
    t = torch.full((batch,), 500)

    def call(unet):
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=text)

    return interleaved_medians({k: (lambda u=u: call(u)) for k, u in unets.items()}, rounds)


def run(quick: bool = False) -> dict:
    base = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    pruned = {level: DiffusionModel.from_pretrained(MODELS_DIR / PRUNED_MODEL.format(level)) for level in (1, 2)}
    n, rounds = (32, 3) if quick else (1000, 30)
    w = float(base.defaults.get("guidance", 1.0))
    reference, floor = fid_reference(n)  # shared with steps_quality, as the full base's renders (bench/references.py)
    figures = {"images": n, "guidance": w, "fid_real": floor}

    def quality(model, key: str, steps: int, adapters=(), registry=None) -> None:
        images, prompts = eval_images(model, n, guidance=w, steps=steps, batch=250, adapters=adapters, registry=registry)
        figures[f"align_{key}"], figures[f"fid_{key}"] = alignment_of(images, prompts), reference.fid(images)

    quality(base, "full", TEACHER_STEPS)
    size, text_dim = base.unet.config.sample_size, base.unet.config.cross_attention_dim
    calls = {}  # (level, batch) -> median seconds of one call of the full and the pruned UNet
    for level, model in pruned.items():
        figures[f"params_ratio_l{level}"] = parameter_count(model.unet) / parameter_count(base.unet)
        for batch, suffix in ((1, ""), (2, "_b2")):
            t = calls[level, batch] = unet_latency({"full": base.unet, "pruned": model.unet}, batch, size, text_dim,
                                                   rounds * 10)
            figures[f"latency_ratio{suffix}_l{level}"] = t["pruned"] / t["full"]
        quality(model, f"l{level}", TEACHER_STEPS)
        figures[f"alignment_gap_l{level}"] = figures["align_full"] - figures[f"align_l{level}"]
        figures[f"fid_ratio_l{level}"] = figures[f"fid_l{level}"] / figures["fid_full"]

    torch.manual_seed(0)
    sd = (sd15_unet(block_out_channels=(32, 32, 64, 64), sample_size=16) if quick else sd15_unet()).eval()
    unets = {"full": sd, **{f"l{level}": prune_unet(sd, level_spec(sd.config, level))[0] for level in (1, 2)}}
    t = unet_latency(unets, 1, sd.config.sample_size, sd.config.cross_attention_dim, 2 if quick else 5)
    for level in (1, 2):
        figures[f"params_ratio_sd15_l{level}"] = parameter_count(unets[f"l{level}"]) / parameter_count(sd)
        figures[f"latency_ratio_sd15_l{level}"] = t[f"l{level}"] / t["full"]
    figures["sd15_unet_ms"] = t["full"] * 1e3
    del unets, sd

    small = pruned[ALL_LEVERS_LEVEL]
    registry = AdapterRegistry(small)  # serving the pruned base: its serving layers installed
    adapter = registry.load(ALL_LEVERS_ADAPTER, EMBEDDED_ADAPTERS / ALL_LEVERS_ADAPTER)
    levers = ((adapter, 1.0),)
    whole = interleaved_medians({
        "full": lambda: generate(base, [PROMPT], [0], w, TEACHER_STEPS),
        "all": lambda: generate(small, [PROMPT], [0], w, STUDENT_STEPS, adapters=levers, registry=registry),
    }, rounds)
    parts = interleaved_medians({
        "text_1": lambda: base.encode_prompts([PROMPT]), "text_2": lambda: base.encode_prompts([PROMPT, ""]),
        "decode": lambda: base.decode(torch.zeros(1, 4, size, size)),
    }, rounds * 3)
    full_image = parts["text_2"] + TEACHER_STEPS * calls[ALL_LEVERS_LEVEL, 2]["full"] + parts["decode"]
    small_image = parts["text_1"] + STUDENT_STEPS * calls[ALL_LEVERS_LEVEL, 1]["pruned"] + parts["decode"]
    figures.update({"full_image_ms": whole["full"] * 1e3, "all_image_ms": whole["all"] * 1e3,
                    "speedup_all": whole["full"] / whole["all"], "speedup_all_limit": full_image / small_image})
    quality(small, "all", STUDENT_STEPS, adapters=levers, registry=registry)
    figures["alignment_gap_all"] = figures["align_full"] - figures["align_all"]
    figures["fid_ratio_all"] = figures["fid_all"] / figures["fid_full"]
    return figures
