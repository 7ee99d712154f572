"""The engine: owns the model, the bounded request queue, warm-up and the worker.

One worker runs jobs in order on a thread (torch releases the GIL), so the event loop
keeps answering health checks and rejecting overflow while an image is being made.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from server.model import DiffusionModel
from server.pipeline import Generated, generate


class QueueFull(Exception):
    pass


@dataclass(frozen=True)
class Job:
    prompt: str
    guidance: float
    steps: int
    seed: int
    scheduler: str = "ddim"


@dataclass
class Result:
    generated: Generated
    job: Job
    timings_ms: dict[str, float]


class Engine:
    def __init__(self, model: DiffusionModel, queue_size: int = 16, timeout_s: float = 120.0):
        self.model = model
        self.timeout_s = timeout_s
        self.queue: asyncio.Queue[tuple[Job, asyncio.Future, float]] = asyncio.Queue(maxsize=queue_size)
        self.ready = False
        self._worker: asyncio.Task | None = None

    @property
    def default_guidance(self) -> float:
        return float(self.model.defaults.get("guidance", 0.0))

    @property
    def default_steps(self) -> int:
        return int(self.model.defaults.get("steps", 25))

    async def start(self) -> None:
        await asyncio.to_thread(self.warmup)
        self._worker = asyncio.create_task(self._run())
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self._worker:
            self._worker.cancel()

    def warmup(self) -> None:
        """One tiny generation: first-call allocations and lazy inits happen before traffic."""
        generate(self.model, ["warm-up"], [0], 0.0, steps=2)

    async def submit(self, job: Job) -> Result:
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((job, future, time.perf_counter()))
        except asyncio.QueueFull:
            raise QueueFull(f"queue is full ({self.queue.maxsize} waiting); retry later") from None
        return await asyncio.wait_for(future, self.timeout_s)

    async def _run(self) -> None:
        while True:
            job, future, enqueued = await self.queue.get()
            if future.cancelled():  # the client went away or timed out while waiting
                continue
            started = time.perf_counter()
            try:
                out = await asyncio.to_thread(
                    generate, self.model, [job.prompt], [job.seed], job.guidance, job.steps, job.scheduler
                )
            except Exception as exc:  # noqa: BLE001 - delivered to the waiting request
                if not future.done():
                    future.set_exception(exc)
                continue
            timings = {"queue": (started - enqueued) * 1e3, **out.timings_ms,
                       "total": (time.perf_counter() - enqueued) * 1e3}
            if not future.done():
                future.set_result(Result(out, job, timings))
