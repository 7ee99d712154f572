"""Every API's way to the engine: a request becomes Jobs (the ONE job type), submitted together, answered as
images and info. The native, OpenAI and A1111 routes differ only in how they read requests and write answers."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import replace
from functools import partial

from starlette.requests import Request

from distillery.serving.engine import Engine
from distillery.serving.errors import unprocessable
from distillery.serving.jobs import Job, Result, random_seed
from distillery.serving.openapi import Limits
from distillery.serving.schemas import MAX_SEED

DISCONNECT_POLL_S = 0.05


def check_limits(limits: Limits, width: int | None, height: int | None, steps: int | None) -> None:
    """What the loaded model allows (the OpenAPI document states it: distillery/serving/openapi.py)."""
    step, most = limits.size_step, limits.max_size
    for field, value in (("width", width), ("height", height)):
        if value is not None and (value % step or not step <= value <= most):
            raise unprocessable(field, f"{field}: {value} is not allowed (allowed: a multiple of {step} in [{step}, "
                                       f"{most}])")
    if steps is not None and steps > limits.max_steps:
        raise unprocessable("steps", f"steps: {steps} is more than this server allows (allowed: integer in "
                                     f"[1, {limits.max_steps}])")


def jobs_of(job: Job, n: int, seed: int | None) -> list[Job]:
    """n images of one request: seeds seed, seed + 1, ... (a random seed if none is given; past the largest seed
    they wrap to 0, so every valid seed takes every n)."""
    seed = random_seed() if seed is None else seed
    return [replace(job, seed=(seed + i) % (MAX_SEED + 1)) for i in range(n)]


async def run_jobs(eng: Engine, jobs: list[Job], request: Request | None = None, on_step=None) -> list[Result] | None:
    """The jobs' results, in order. Submitted together, they share UNet calls with each other and with whatever
    else is in flight. `on_step(i, done, steps)`: image i's progress. The first failure cancels the others and is
    raised; a client that goes away (`request` given) cancels them all: None."""
    tasks = [asyncio.create_task(eng.submit(job, on_step and partial(on_step, i))) for i, job in enumerate(jobs)]
    try:
        while not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=DISCONNECT_POLL_S, return_when=asyncio.FIRST_EXCEPTION)
            if failed := next((t for t in tasks if t.done() and not t.cancelled() and t.exception()), None):
                raise failed.exception()
            if request is not None and await request.is_disconnected():
                return None
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()


def info_of(result: Result) -> dict:
    """One image's info, as every API reports it (the native API's GenerateInfo)."""
    job = result.job  # with the scheduler and steps it was sampled with
    return {"seed": job.seed, "guidance": job.guidance, "steps": job.steps, "scheduler": job.scheduler,
            "mode": result.mode, "unet_evaluations": result.unet_evaluations,
            "adapters": [list(a) for a in job.adapters],
            "latency_ms": {k: round(v, 2) for k, v in result.timings_ms.items()}, "peak_memory": result.peak_memory}


async def encoded_b64(results: list[Result], fmt: str = "png", quality: int | None = None) -> list[str]:
    """Base64 images, encoded off the event loop."""
    return await asyncio.to_thread(lambda: [base64.b64encode(r.encoded(fmt, quality)).decode() for r in results])


async def stream_events(first, events: asyncio.Queue, run: asyncio.Task, answer):
    """Server-sent events from the `events` queue (None ends it), then `result` with `answer(results)`, or
    `error` if the run failed after the stream began. A client that goes away cancels the run."""
    try:
        item = first
        while item is not None:
            yield _event(*item)
            item = await events.get()
        try:
            yield _event("result", await answer(await run))
        except Exception as exc:  # noqa: BLE001 - the status line is sent: the failure goes in the stream
            yield _event("error", {"status": getattr(exc, "status_code", 500), "detail": str(exc)})
    finally:
        run.cancel()


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
