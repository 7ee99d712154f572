"""http_overhead: the same request end-to-end over HTTP on loopback vs in-process.

HTTP: a real `distillery serve` (uvicorn) subprocess, requests from httpx, PNG bytes back.
In-process: Engine.submit in this process plus PNG encoding. Interleaved, medians.
"""

from __future__ import annotations

import asyncio

import httpx

from bench.common import interleaved_medians
from distillery.model import DiffusionModel
from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_MODEL
from distillery.serving.engine import Engine
from distillery.serving.jobs import TORCH_THREAD, Job
from distillery.testing.launch import serve_subprocess


def run(quick: bool = False) -> dict:
    steps, rounds = (3, 3) if quick else (25, 15)
    body = {"prompt": "a small blue triangle", "guidance": 2.0, "steps": steps, "seed": 3,
            "adapters": [{"name": "guidance-toy"}]}
    loop = asyncio.new_event_loop()
    with serve_subprocess(ready_within_s=120) as url:
        def make_engine() -> Engine:  # torch work on the engine's one torch thread (distillery/serving/engine.py)
            engine = Engine(DiffusionModel.from_pretrained(EMBEDDED_MODEL))
            engine.load_adapters_from(EMBEDDED_ADAPTERS)
            return engine

        engine = TORCH_THREAD.submit(make_engine).result()
        loop.run_until_complete(engine.start())
        job = Job(prompt=body["prompt"], guidance=2.0, steps=steps, seed=3, adapters=(("guidance-toy", 1.0),))
        client = httpx.Client(timeout=60)

        def over_http():
            resp = client.post(f"{url}/generate", json=body)
            assert resp.status_code == 200

        def in_process():
            loop.run_until_complete(engine.submit(job)).png

        times = interleaved_medians({"http": over_http, "in_process": in_process}, rounds, warmup=2)
        loop.run_until_complete(engine.stop())
    loop.close()
    return {"ratio": times["http"] / times["in_process"], "http_ms": times["http"] * 1e3,
            "in_process_ms": times["in_process"] * 1e3}
