"""gpu_throughput: 8 concurrent clients with mixed adapters vs the same requests one at a time, through the
real engine (distillery/serving/engine.py: Engine.submit in an asyncio loop, step-level batching, throughput
mode) (GPU suite; bench/gpu_common.py).

SD-1.5-shaped model, random weights, fp16, 512x512, DDIM 25 steps (quick: 4), w = 2. Client c sends one
request with adapters mixes[c % 4]: none (CFG), a rank-64 guidance adapter (single-eval), a rank-64 style
adapter (CFG), both (single-eval, style at 0.5): 12 UNet rows per step while all 8 are in flight (the
engine's default budget). Rounds (3) alternate the 8 requests one at a time and the 8 at once, after an
untimed 2-step concurrent round on the GPU (the 12-row shapes' first calls).
  throughput_8_clients   images/s with 8 concurrent clients / images/s one request at a time (median over
                         rounds; target: >= 3)
  batching_limit         what batching alone can give on this device: the 8 requests' UNet calls one
                         request at a time (4 x 2 rows + 4 x 1 row) over one 12-row call, W0 alone
  p99_over_solo          p99 latency under concurrency / median latency of the same requests alone
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import timed_submits
from bench.gpu_common import PROMPT, W, base_model, interleaved_medians, plan_for, random_adapter, setup
from distillery.serving.engine import Engine
from distillery.serving.jobs import TORCH_THREAD, Job

NEEDS_CUDA = True
CPU_SMOKE = True
CLIENTS = 8
MIXES = [(), (("guidance", 1.0),), (("style", 1.0),), (("guidance", 1.0), ("style", 0.5))]


def _jobs(round_: int, per_client: int, steps: int) -> list[list[Job]]:
    return [[Job(prompt=f"{PROMPT} {c}", guidance=W, steps=steps, seed=round_ * 1000 + c * 100 + i,
                 adapters=MIXES[c % len(MIXES)]) for i in range(per_client)] for c in range(CLIENTS)]


async def _sequential(engine, clients) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    solo = [x for jobs in clients for x in await timed_submits(engine, jobs)]
    return time.perf_counter() - t0, solo


async def _concurrent(engine, clients) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    crowd = [x for lat in await asyncio.gather(*(timed_submits(engine, jobs) for jobs in clients)) for x in lat]
    return time.perf_counter() - t0, crowd


def _batching_limit(plan, model, rounds: int) -> dict[str, float]:
    """Seconds of one base UNet call over 1, 2 and 12 rows (CUDA events, interleaved)."""
    unet = model.unet
    size, dev = unet.config.sample_size, {"device": plan.device, "dtype": plan.dtype}
    inputs = {n: (torch.randn(n, unet.config.in_channels, size, size, **dev), torch.full((n,), 500, device=plan.device),
                  torch.randn(n, model.tokenizer.model_max_length, unet.config.cross_attention_dim, **dev))
              for n in (1, 2, 12)}

    def call(n):
        x, t, text = inputs[n]
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=text)

    return interleaved_medians(plan, {n: (lambda n=n: call(n)) for n in inputs}, rounds, warmup=2)


def run(quick: bool = False, device: str = "cuda") -> dict:
    plan = plan_for(device, quick)
    steps, per_client, rounds = plan.pick(25, 4, 2), 1, plan.pick(3, 1, 1)
    tmp = tempfile.TemporaryDirectory()

    def make_engine() -> Engine:  # all torch work on the engine's one torch thread
        model = base_model(plan)
        engine = Engine(model, queue_size=64)
        for i, kind in enumerate(("guidance", "style")):
            engine.registry.load(kind, random_adapter(plan, Path(tmp.name) / kind, model, kind=kind, seed=i))
        return engine

    engine = TORCH_THREAD.submit(make_engine).result()

    async def main():
        await engine.start()  # warm-up: one tiny generation per mode and adapter
        if not plan.smoke:  # the 12-row shapes' first calls (kernel compilation, allocator growth), untimed
            await _concurrent(engine, _jobs(99, 1, 2))
        out = []
        for r in range(rounds):
            out.append((await _sequential(engine, _jobs(r, per_client, steps)),
                        await _concurrent(engine, _jobs(r, per_client, steps))))
        await engine.stop()
        return out

    measured = asyncio.run(main())
    tmp.cleanup()
    unet_s = TORCH_THREAD.submit(_batching_limit, plan, engine.model, plan.pick(10, 2, 1)).result()
    solo = [x for (_, s), _ in measured for x in s]
    crowd = [x for _, (_, c) in measured for x in c]
    n = CLIENTS * per_client
    p99 = float(np.percentile(crowd, 99))
    return {
        "throughput_8_clients": statistics.median(seq / conc for (seq, _), (conc, _) in measured),
        "batching_limit": (4 * unet_s[2] + 4 * unet_s[1]) / unet_s[12],
        "p99_over_solo": p99 / statistics.median(solo),
        "images_per_s_sequential": n / statistics.median(seq for (seq, _), _ in measured),
        "images_per_s_concurrent": n / statistics.median(conc for _, (conc, _) in measured),
        "solo_median_ms": statistics.median(solo) * 1e3, "concurrent_p50_ms": statistics.median(crowd) * 1e3,
        "concurrent_p99_ms": p99 * 1e3, **{f"unet_{k}_rows_ms": v * 1e3 for k, v in unet_s.items()},
        "requests_per_round": n, "rounds": rounds, "steps": steps, "setup": setup(plan),
    }
