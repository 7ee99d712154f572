"""xl_prune: the SSD-1B-style toy-xl (models/toy-xl-pruned: every transformer stack cut to one layer, the mid block
removed; its pruning.json) judged against toy-xl as prune judges the toy's levels.

params_ratio = pruned / full UNet parameters; latency_ratio (_b2: the CFG batch of 2) = one UNet call of each on
the same prompt's conditioning at toy-xl's size, interleaved medians; alignment_gap and fid_ratio at 25-step
CFG at toy-xl's default w, the same prompts and seeds (FID with the oracle's features).
Every lever at once, on the pruned base: its consistency adapter at 4 steps and its style, composed, against the
same request the slow way, toy-xl with its own style at 25-step CFG: speedup_all (whole images, interleaved),
speedup_all_limit (the same ratio from the components), alignment_gap_all and fid_ratio_all (the style costs
the oracle alignment by itself, so the teacher is styled too); alignment_gap_lcm: the pruned base's 4 steps
without the style against toy-xl's plain 25-step CFG; style_strength_all (0 = the pruned base's plain 25-step CFG
images, 1 = its style alone at 25-step CFG).
"""

from __future__ import annotations

from bench.prune import PROMPT, STUDENT_STEPS, TEACHER_STEPS, every_lever_speed, quality, unet_latency
from bench.references import eval_images, fid_reference
from distillery.adapters import AdapterRegistry
from distillery.distill.methods.pruned_unet import parameter_count
from distillery.distill.methods.style import stripe_score, style_strength
from distillery.model import DiffusionModel
from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_XL_MODEL, MODELS_DIR

PRUNED = MODELS_DIR / "toy-xl-pruned"
CONSISTENCY, STYLE = "lcm-toy-xl-pruned", "stripes-toy-xl-pruned"
BASE_STYLE = "stripes-toy-xl"


def run(quick: bool = False) -> dict:
    base, small = DiffusionModel.from_pretrained(EMBEDDED_XL_MODEL), DiffusionModel.from_pretrained(PRUNED)
    n, n_small, rounds = (32, 8, 3) if quick else (1000, 200, 30)
    w = float(base.defaults.get("guidance", 1.0))
    reference, floor = fid_reference(n)
    figures = {"images": n, "guidance": w, "fid_real": floor,
               "params_ratio": parameter_count(small.unet) / parameter_count(base.unet)}
    size = base.default_size
    calls = {}
    for batch, suffix in ((1, ""), (2, "_b2")):
        conditioning = base.encode_prompts([PROMPT] * batch).sized(size, size)
        calls[batch] = unet_latency({"full": base.unet, "pruned": small.unet}, conditioning,
                                    base.unet.config.sample_size, rounds * 10)
        figures[f"latency_ratio{suffix}"] = calls[batch]["pruned"] / calls[batch]["full"]
        figures[f"unet{suffix or '_b1'}_full_ms"] = calls[batch]["full"] * 1e3
    quality(figures, reference, base, "full", n, w, TEACHER_STEPS)
    plain = quality(figures, reference, small, "pruned", n, w, TEACHER_STEPS)
    figures["alignment_gap"] = figures["align_full"] - figures["align_pruned"]
    figures["fid_ratio"] = figures["fid_pruned"] / figures["fid_full"]

    registry = AdapterRegistry(small)  # serving the pruned base: its serving layers installed
    lcm, style = (((registry.load(name, EMBEDDED_ADAPTERS / name), 1.0),) for name in (CONSISTENCY, STYLE))
    levers = lcm + style
    base_registry = AdapterRegistry(base)  # the same request the slow way: toy-xl's own style at 25-step CFG
    base_style = ((base_registry.load(BASE_STYLE, EMBEDDED_ADAPTERS / BASE_STYLE), 1.0),)
    figures.update(every_lever_speed(base, small, registry, levers, w, rounds, calls[2]["full"], calls[1]["pruned"],
                                     base_style, base_registry))
    quality(figures, reference, base, "full_styled", n, w, TEACHER_STEPS, adapters=base_style, registry=base_registry)
    composed = quality(figures, reference, small, "all", n, w, STUDENT_STEPS, adapters=levers, registry=registry)
    figures["alignment_gap_all"] = figures["align_full_styled"] - figures["align_all"]
    figures["fid_ratio_all"] = figures["fid_all"] / figures["fid_full_styled"]
    quality(figures, reference, small, "lcm", n, w, STUDENT_STEPS, adapters=lcm, registry=registry)
    figures["alignment_gap_lcm"] = figures["align_full"] - figures["align_lcm"]
    styled, _ = eval_images(small, n_small, guidance=w, steps=TEACHER_STEPS, adapters=style, registry=registry,
                            batch=250)
    figures["style_strength_all"] = style_strength(composed[:n_small], stripe_score(plain[:n_small]),
                                                   stripe_score(styled))
    return figures
