"""throughput: 8 concurrent clients with mixed adapters vs the same requests one at a time, in
both engine modes.

In-process engine (step-level batching); HTTP costs are measured separately (http_overhead).
speedup = images/s concurrent / images/s sequential; p99_over_solo = p99 latency under
concurrency / median latency of the same requests alone. p99_floor: one UNet call over all
the clients' rows (12: four CFG requests, four single-eval) / the median solo request's UNet call
(between a CFG request's 2 rows and a single-eval one's 1), the base alone: what p99_over_solo
would be on this device with free LoRA and no other overhead. p99_floor_cfg divides by the 2-row
call instead.
Throughput mode (the default) gives the unsuffixed figures; deterministic mode (one UNet call
per image row) the `_deterministic` ones: its price in latency and throughput.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import interleaved_medians, timed_submits
from distillery.model import DiffusionModel
from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_MODEL
from distillery.serving.engine import Engine
from distillery.serving.jobs import TORCH_THREAD, Job
from distillery.testing.synthetic_adapters import write_random_adapter

CLIENTS = 8


def _jobs(per_client: int, steps: int) -> list[list[Job]]:
    mixes = [(), (("guidance-toy", 1.0),), (("style", 1.0),), (("guidance-toy", 1.0), ("style", 0.5))]
    return [[Job(prompt=f"a red circle {c}", guidance=2.0, steps=steps, seed=c * 100 + i, adapters=mixes[c % 4])
             for i in range(per_client)] for c in range(CLIENTS)]


async def _measure(engine: Engine, clients: list[list[Job]]) -> tuple[list[float], list[float], float, float]:
    solo = []
    t0 = time.perf_counter()
    for jobs in clients:
        for job in jobs:
            t = time.perf_counter()
            await engine.submit(job)
            solo.append(time.perf_counter() - t)
    sequential = time.perf_counter() - t0

    t0 = time.perf_counter()
    crowd = [x for lat in await asyncio.gather(*(timed_submits(engine, j) for j in clients)) for x in lat]
    return solo, crowd, sequential, time.perf_counter() - t0


def _unet_times(model, row_counts: set[int], rounds: int) -> dict[int, float]:
    """Median seconds of one base UNet call (no adapter) over n rows, for each n, interleaved."""
    unet = model.unet
    tokens, dim = model.tokenizer.model_max_length, unet.config.cross_attention_dim
    inputs = {n: (torch.randn(n, 4, 16, 16), torch.full((n,), 500), torch.randn(n, tokens, dim)) for n in row_counts}

    def call(n):
        x, t, text = inputs[n]
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=text)

    return interleaved_medians({n: (lambda n=n: call(n)) for n in row_counts}, rounds)


def _mode(deterministic: bool, per_client: int, steps: int, tmp: str) -> tuple[Engine, dict]:
    def make_engine() -> Engine:  # torch work on the engine's one torch thread (distillery/serving/engine.py)
        model = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
        engine = Engine(model, queue_size=64, deterministic=deterministic)
        engine.load_adapters_from(EMBEDDED_ADAPTERS)
        style = write_random_adapter(Path(tmp) / f"style-{deterministic}", model.unet, model.fingerprint, rank=8)
        engine.registry.load("style", style)
        return engine

    engine = TORCH_THREAD.submit(make_engine).result()

    async def main():
        await engine.start()
        result = await _measure(engine, _jobs(per_client, steps))
        await engine.stop()
        return result

    solo, crowd, sequential_s, concurrent_s = asyncio.run(main())
    n = len(solo)
    p99 = float(np.percentile(crowd, 99))
    return engine, {"speedup": sequential_s / concurrent_s, "p99_over_solo": p99 / statistics.median(solo),
                    "images_per_s_sequential": n / sequential_s, "images_per_s_concurrent": n / concurrent_s,
                    "solo_median_ms": statistics.median(solo) * 1e3, "concurrent_p99_ms": p99 * 1e3,
                    "concurrent_p50_ms": statistics.median(crowd) * 1e3, "requests": n}


def run(quick: bool = False) -> dict:
    per_client, steps = (1, 3) if quick else (3, 25)
    with tempfile.TemporaryDirectory() as tmp:
        engine, figures = _mode(False, per_client, steps, tmp)
        solo_rows = [1 if any(n == "guidance-toy" for n, _ in c[0].adapters) else 2 for c in _jobs(1, 1)]
        unet = TORCH_THREAD.submit(_unet_times, engine.model, {sum(solo_rows), *solo_rows}, 3 if quick else 30).result()
        # the floor is p99_over_solo's own statistic on base UNet calls alone (free LoRA, no other overhead):
        # the crowd's call over the median solo request's call (the clients' solo requests are half CFG,
        # 2 rows, half single-eval, 1 row, so their median lies between the two)
        figures["p99_floor"] = unet[sum(solo_rows)] / statistics.median([unet[r] for r in solo_rows * per_client])
        figures["p99_floor_cfg"] = unet[sum(solo_rows)] / unet[2]  # over a CFG request's call alone
        figures["p99_over_floor"] = figures["p99_over_solo"] / figures["p99_floor"]
        figures |= {f"unet_{n}_rows_ms": unet[n] * 1e3 for n in sorted(unet)}
        _, deterministic = _mode(True, per_client, steps, tmp)
    figures |= {f"{k}_deterministic": v for k, v in deterministic.items() if k != "requests"}
    figures["solo_cost_deterministic"] = figures["solo_median_ms_deterministic"] / figures["solo_median_ms"]
    return figures
