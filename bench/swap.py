"""swap: switching the adapters a batch uses, against one request's latency, and cold loads.

A switch is making the next UNet call use another resident adapter set: switch_ms with the
set's per-call slots already composed (a cached lookup, the steady state); switch_first_ms
composing them from nothing: in merged mode (the CPU default) merging the set's layers, in
per-row mode views of the owned tensors for one adapter at weight 1, or a rank-concatenated
copy with the weights folded in for a composed or weighted set.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from bench.common import GUIDANCE_ADAPTER, sd15_with_adapter, toy_with_guidance_adapter
from distillery.adapters import default_merged_budget
from distillery.paths import EMBEDDED_ADAPTERS
from distillery.sampling.pipeline import generate
from distillery.testing.synthetic_adapters import write_random_adapter


def _switch_ms(registry, set_a, set_b, rows: int, repeats: int, first: bool = False) -> float:
    """Median time to make a batch use the other set; `first`: with nothing composed or merged yet."""
    times = []
    for _ in range(repeats):
        for chosen in (set_a, set_b):
            if first:
                registry.forget_cached()
            t0 = time.perf_counter()
            with registry.active([chosen] * rows):
                pass
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _cold_load_ms(registry, name: str, folder: Path, repeats: int) -> float:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        registry.load(f"{name}-{i}", folder)
        times.append(time.perf_counter() - t0)
        registry.unload(f"{name}-{i}")
    return statistics.median(times) * 1e3


def run(quick: bool = False) -> dict:
    """Both LoRA modes: merged (the CPU default) and per-row (suffix _per_row; the CUDA default)."""
    repeats = 5 if quick else 200
    model, registry, guidance = toy_with_guidance_adapter()
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        style = registry.load("style", write_random_adapter(Path(tmp) / "style", model.unet, model.fingerprint, rank=16))
        sd_model, sd_registry, sd_adapter = sd15_with_adapter(Path(tmp) / "sd", quick, kind="style", rank=64)
        sd_style2 = sd_registry.load("sd15-style2", write_random_adapter(
            Path(tmp) / "sd2", sd_model.unet, sd_model.fingerprint, rank=64, seed=1))
        for suffix, budget in (("", default_merged_budget(model.device)), ("_per_row", 0)):
            registry.merged_budget_bytes = sd_registry.merged_budget_bytes = budget
            a, b = ((guidance, 1.0),), ((style, 1.0),)
            figures["switch_ms" + suffix] = _switch_ms(registry, a, b, rows=1, repeats=repeats)
            figures["switch_first_ms" + suffix] = _switch_ms(registry, a, b, rows=1, repeats=repeats // 4 + 1, first=True)
            figures["switch_composed_ms" + suffix] = _switch_ms(registry, ((guidance, 1.0), (style, 0.7)), b, rows=1,
                                                                repeats=repeats)
            steps = 3 if quick else 25
            t0 = time.perf_counter()
            for _ in range(3):
                generate(model, ["a red circle"], [0], 2.0, steps, adapters=a, registry=registry)
            figures["request_ms" + suffix] = (time.perf_counter() - t0) / 3 * 1e3
            figures["switch_share" + suffix] = figures["switch_ms" + suffix] / figures["request_ms" + suffix]
            sd_a, sd_b = ((sd_adapter, 1.0),), ((sd_style2, 1.0),)
            figures["switch_ms_sd15" + suffix] = _switch_ms(sd_registry, sd_a, sd_b, rows=2, repeats=repeats)
            figures["switch_first_ms_sd15" + suffix] = _switch_ms(sd_registry, sd_a, sd_b, rows=2,
                                                                  repeats=3 if quick else 10, first=True)
        figures["cold_load_ms"] = _cold_load_ms(registry, "cold", EMBEDDED_ADAPTERS / GUIDANCE_ADAPTER, 3 if quick else 20)
        figures["cold_load_ms_sd15"] = _cold_load_ms(sd_registry, "cold", Path(tmp) / "sd2", 3 if quick else 5)
    return figures
