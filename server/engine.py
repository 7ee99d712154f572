"""The engine: owns the model, the adapters, the bounded request queue, warm-up and the worker.

One worker runs jobs in order on a thread (torch releases the GIL), so the event loop
keeps answering health checks and rejecting overflow while an image is being made.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from server.adapters import META_FILE, AdapterError
from server.model import DiffusionModel
from server.pipeline import Generated, generate
from server.registry import AdapterRegistry, LoadedAdapter, check_guidance

log = logging.getLogger("distillery.engine")


class QueueFull(Exception):
    pass


@dataclass(frozen=True)
class Job:
    prompt: str
    guidance: float
    steps: int
    seed: int
    scheduler: str = "ddim"
    adapters: tuple[tuple[str, float], ...] = ()


@dataclass
class Result:
    generated: Generated
    job: Job
    timings_ms: dict[str, float]


class Engine:
    def __init__(self, model: DiffusionModel, queue_size: int = 16, timeout_s: float = 120.0):
        self.model = model
        self.registry = AdapterRegistry(model)
        self.timeout_s = timeout_s
        self.queue: asyncio.Queue[tuple[Job, list, asyncio.Future, float]] = asyncio.Queue(maxsize=queue_size)
        self.ready = False
        self._worker: asyncio.Task | None = None

    @property
    def default_guidance(self) -> float:
        return float(self.model.defaults.get("guidance", 0.0))

    @property
    def default_steps(self) -> int:
        return int(self.model.defaults.get("steps", 25))

    def load_adapters_from(self, root: str | Path) -> list[str]:
        """Load every adapter folder under `root`, named after its folder; a bad one is logged and skipped."""
        loaded = []
        for folder in sorted(Path(root).glob(f"*/{META_FILE}")):
            try:
                self.registry.load(folder.parent.name, folder.parent)
                loaded.append(folder.parent.name)
            except AdapterError as exc:
                log.warning("adapter %s not loaded: %s", folder.parent, exc)
        return loaded

    def resolve(self, job: Job) -> list[tuple[LoadedAdapter, float]]:
        """The job's adapters, checked: UnknownAdapter for an unknown name, AdapterError for an unusable set or w."""
        chosen = [(self.registry.get(name), weight) for name, weight in job.adapters]
        check_guidance(chosen, job.guidance)
        return chosen

    async def start(self) -> None:
        await asyncio.to_thread(self.warmup)
        self._worker = asyncio.create_task(self._run())
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self._worker:
            self._worker.cancel()

    def warmup(self) -> None:
        """One tiny generation per mode: first-call allocations and lazy inits happen before traffic."""
        generate(self.model, ["warm-up"], [0], 0.0, steps=2)
        for adapter in self.registry.adapters.values():
            generate(self.model, ["warm-up"], [0], adapter.meta.w_min, steps=1, adapters=[(adapter, 1.0)])

    async def submit(self, job: Job) -> Result:
        chosen = self.resolve(job)
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((job, chosen, future, time.perf_counter()))
        except asyncio.QueueFull:
            raise QueueFull(f"queue is full ({self.queue.maxsize} waiting); retry later") from None
        return await asyncio.wait_for(future, self.timeout_s)

    async def _run(self) -> None:
        while True:
            job, chosen, future, enqueued = await self.queue.get()
            if future.cancelled():  # the client went away or timed out while waiting
                continue
            started = time.perf_counter()
            try:
                out = await asyncio.to_thread(generate, self.model, [job.prompt], [job.seed], job.guidance, job.steps,
                                              job.scheduler, adapters=chosen)
            except Exception as exc:  # noqa: BLE001 - delivered to the waiting request
                if not future.done():
                    future.set_exception(exc)
                continue
            timings = {"queue": (started - enqueued) * 1e3, **out.timings_ms,
                       "total": (time.perf_counter() - enqueued) * 1e3}
            if not future.done():
                future.set_result(Result(out, job, timings))
