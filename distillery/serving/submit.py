"""Every API's way to the engine: a request becomes Jobs (the ONE job type), submitted together, answered as
images and info. The native, OpenAI and A1111 routes differ only in how they read requests and write answers."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import replace

from sse_starlette import EventSourceResponse
from starlette.requests import Request

from distillery.serving.engine import Engine
from distillery.serving.jobs import Job, Result, random_seed
from distillery.serving.schemas import MAX_SEED


def jobs_of(job: Job, n: int, seed: int | None) -> list[Job]:
    """n images of one request: seeds seed, seed + 1, ... (a random seed if none is given; past the largest seed
    they wrap to 0, so every valid seed takes every n)."""
    seed = random_seed() if seed is None else seed
    return [replace(job, seed=(seed + i) % (MAX_SEED + 1)) for i in range(n)]


async def run_jobs(eng: Engine, jobs: list[Job], request: Request | None = None) -> list[Result] | None:
    """The jobs' results, in order: queued together (all or none), they share UNet calls with each other and with
    whatever else is in flight. A refusal or the first failure is raised; a client that goes away (`request`
    given) cancels them all: None."""
    items = await eng.submit_all(jobs)
    return await eng.results(items, request.is_disconnected if request is not None else None)


def info_of(result: Result) -> dict:
    """One image's info, as every API reports it (the native API's GenerateInfo)."""
    job = result.job  # with the guidance, scheduler and steps it was sampled with
    return {"seed": job.seed, "guidance": job.guidance, "guidance_rescale": job.guidance_rescale, "steps": job.steps,
            "scheduler": job.scheduler,
            "mode": result.mode, "unet_evaluations": result.unet_evaluations,
            "adapters": [list(a) for a in job.adapters],
            "latency_ms": {k: round(v, 2) for k, v in result.timings_ms.items()}, "peak_memory": result.peak_memory}


async def encoded_b64(results: list[Result], fmt: str = "png", quality: int | None = None) -> list[str]:
    """Base64 images, encoded off the event loop."""
    return await asyncio.to_thread(lambda: [base64.b64encode(r.encoded(fmt, quality)).decode() for r in results])


async def streamed(eng: Engine, jobs: list[Job], answer, drain_s: float) -> EventSourceResponse:
    """Server-sent events: `progress` {index, step, steps} after each step of image `index`, then `result` with
    `await answer(results)`, or `error` {status, detail} if it fails once the stream began. Refusals are raised
    here, before the stream, so they answer as HTTP errors; a client that goes away cancels the work. A stream in
    flight at shutdown may finish for `drain_s` (sse-starlette would otherwise end it at SIGTERM)."""
    events: asyncio.Queue = asyncio.Queue()
    items = await eng.submit_all(jobs, on_step=lambda i, k, n: events.put_nowait(
        ("progress", {"index": i, "step": k, "steps": n})))

    async def stream():
        run = asyncio.create_task(eng.results(items))
        run.add_done_callback(lambda _: events.put_nowait(None))
        try:
            while (item := await events.get()) is not None:
                yield _event(*item)
            try:
                yield _event("result", await answer(await run))
            except Exception as exc:  # noqa: BLE001 - the status line is sent: the failure goes in the stream
                yield _event("error", {"status": getattr(exc, "status_code", 500), "detail": str(exc)})
        finally:
            run.cancel()  # the client left (sse-starlette cancels this generator): the engine drops the work

    return EventSourceResponse(stream(), sep="\n", headers={"Cache-Control": "no-cache"}, shutdown_grace_period=drain_s)


def _event(name: str, data: dict) -> dict:
    return {"event": name, "data": json.dumps(data, separators=(",", ":"))}
