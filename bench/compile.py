"""compile: torch.compile of the served UNet (inductor, here on CPU) with zero recompiles across adapter
swaps, adapter sets, weights, w values and batch sizes.

The compiled UNet carries its adapters in fixed slots (distillery/adapters/slots.py); every batch-size bucket
is compiled at warm-up. Then a scripted sequence of UNet calls, each a mix of requests (random adapter sets
and weights, w, timesteps, row counts within the buckets, an adapter swapped into a slot half-way) runs through
it, and `recompiles` counts the graphs dynamo made during the sequence (target 0). `speedup`: the eager served
UNet (AdapterRegistry's serving layers, the server's default on this device) over the compiled one, per UNet
call on the same inputs, interleaved, median over the sequence (target >= 1.3 on the toy). `max_abs_diff`: the
two outputs' largest difference over the sequence (they compute the same eps). SD-1.5 shape: random weights,
random rank-64 adapters, 32x32 latents (full mode only).
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from distillery.adapters import AdapterRegistry
from distillery.adapters.backends.compiled import BUCKETS, SlotAdapters
from distillery.model import Conditioning, DiffusionModel, unet_fingerprint
from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_MODEL
from distillery.sampling.guidance import EMBEDDING_DIM, guidance_embedding
from distillery.serving.config import Settings
from distillery.testing.sd15 import sd15_scheduler, sd15_unet
from distillery.testing.synthetic_adapters import write_random_adapter

TOY_ADAPTERS = ["guidance-toy", "lcm-toy", "stripes-toy"]
SWAPPED_IN = "progressive-toy-4"  # replaces guidance-toy in its slot half-way through the sequence


def run(quick: bool = False) -> dict:
    figures = {f"toy_{k}": v for k, v in _toy(calls=6 if quick else 50, buckets=BUCKETS[:2] if quick else BUCKETS)
               .items()}
    print("toy:", figures, flush=True)  # the SD-1.5 part takes long: these come first
    if not quick:
        figures.update({f"sd15_{k}": v for k, v in _sd15(calls=10).items()})
    figures["recompiles"] = figures["toy_recompiles"] + figures.get("sd15_recompiles", 0)
    figures["speedup"] = figures["toy_speedup"]
    return figures


def _toy(calls: int, buckets: tuple[int, ...]) -> dict:
    eager = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    registry = AdapterRegistry(eager)  # the server's eager path, with its default merging on this device
    adapters = {n: registry.load(n, EMBEDDED_ADAPTERS / n) for n in TOY_ADAPTERS + [SWAPPED_IN]}
    compiled = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    return _measure(eager, registry, compiled, adapters, calls, buckets, swap=("guidance-toy", SWAPPED_IN))


def _sd15(calls: int) -> dict:
    torch.manual_seed(0)
    models = []
    for _ in range(2):  # the eager served copy and the compiled one: the same weights
        torch.manual_seed(0)
        unet = sd15_unet(sample_size=32).eval().requires_grad_(False)
        models.append(DiffusionModel(unet, None, None, None, dict(sd15_scheduler().config), {}, unet_fingerprint(unet)))
    eager, compiled = models
    registry = AdapterRegistry(eager)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {}
        for i, kind in enumerate(["guidance", "style", "style"]):
            folder = write_random_adapter(Path(tmp) / f"a{i}", eager.unet, eager.fingerprint, kind=kind, rank=64,
                                          std=0.01, seed=i)
            adapters[f"sd15-{kind}-{i}"] = registry.load(f"sd15-{kind}-{i}", folder)
        return _measure(eager, registry, compiled, adapters, calls, BUCKETS[:2], rank=64, text_dim=768)


def _measure(eager, registry, compiled, adapters: dict, calls: int, buckets: tuple[int, ...], swap=None, rank=16,
             text_dim=None) -> dict:
    names = list(adapters)
    first = [n for n in names if not swap or n != swap[1]]
    targets = set().union(*(a.layers for a in adapters.values()))
    n_slots = Settings().compile_slots  # the server's default: the cost grows with slots x rank
    slots = SlotAdapters(compiled.unet, EMBEDDING_DIM, slots=n_slots, rank=rank, targets=targets, backend="inductor")
    for name in first:
        slots.load(adapters[name])
    config = eager.unet.config
    shape = (config.in_channels, config.sample_size, config.sample_size)  # the native latent
    text_dim = text_dim or config.cross_attention_dim
    rng = random.Random(0)

    def inputs(rows: int, loaded: list[str]):
        sets = []
        for _ in range(rows):
            picked = rng.sample(loaded, rng.randint(0, 2))
            distilled = [n for n in picked if adapters[n].single_eval][:1]
            chosen = distilled + [n for n in picked if not adapters[n].single_eval]
            sets.append(tuple((adapters[n], rng.choice([0.5, 1.0, 1.5]) if not adapters[n].single_eval else 1.0)
                              for n in chosen))
        x, text = torch.randn(rows, *shape), torch.randn(rows, 77 if text_dim == 768 else 8, text_dim)
        t = torch.randint(1, 1000, (rows,))
        w = guidance_embedding(torch.tensor([rng.uniform(0, 5) for _ in range(rows)]))
        return sets, x, t, text, w

    def run_compiled(sets, x, t, text, w):
        with torch.no_grad():
            return slots.eps(x, t, Conditioning(text), w, sets)

    def run_eager(sets, x, t, text, w):
        with torch.no_grad(), registry.active(sets):
            return eager.unet(x, t, encoder_hidden_states=text, timestep_cond=w).sample

    t0 = time.perf_counter()
    for size in buckets:  # warm-up: one graph per bucket
        run_compiled(*inputs(size, first))
    warmup_s = time.perf_counter() - t0
    graphs = counters["stats"]["unique_graphs"]
    loaded, ratios, diffs = list(first), [], []
    for i in range(calls):
        if swap and i == calls // 2:  # an adapter swap: new weights into the same slot, in place
            slots.unload(swap[0])
            slots.load(adapters[swap[1]])
            loaded = [n for n in loaded if n != swap[0]] + [swap[1]]
        args = inputs(rng.randint(1, max(buckets)), loaded)
        times = {}
        for name, run_one in (("eager", run_eager), ("compiled", run_compiled)) if i % 2 else (
                ("compiled", run_compiled), ("eager", run_eager)):
            t1 = time.perf_counter()
            out = run_one(*args)
            times[name] = (time.perf_counter() - t1, out)
        ratios.append(times["eager"][0] / times["compiled"][0])
        diffs.append((times["eager"][1] - times["compiled"][1]).abs().max().item())
    return {"recompiles": counters["stats"]["unique_graphs"] - graphs, "speedup": statistics.median(ratios),
            "max_abs_diff": max(diffs), "warmup_s": round(warmup_s, 1), "calls": calls, "slots": n_slots, "rank": rank,
            "buckets": len(buckets), "largest_bucket": max(buckets)}
