"""The engine: owns the model, the adapters, the bounded queue, warm-up and step-level batching.

A single worker loop takes every request in flight (up to `max_rows` UNet rows), runs ONE
UNet call for all of them per iteration (rows at different timesteps, w and adapter sets),
and admits newcomers between steps. Tensor work runs on a thread (torch releases the GIL)
so the event loop keeps answering health checks, metrics and overflow (429) meanwhile.
A request whose client went away or timed out is dropped at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from server.adapters import META_FILE, AdapterError
from server.memory import MemoryTracker
from server.metrics import Metrics
from server.model import DiffusionModel
from server.pipeline import Request, finish_request, generate, start_request, unet_step
from server.registry import AdapterRegistry, AdapterSet, check_guidance

log = logging.getLogger("distillery.engine")


class QueueFull(Exception):
    """The queue holds `queue_size` requests already: 429 with Retry-After."""


class RequestTimeout(Exception):
    """Not answered within the request timeout (queued and running): 503 with Retry-After."""


class EngineUnavailable(Exception):
    """Not warmed up yet, stopping, or its worker died: 503 with Retry-After."""


class InvalidJob(ValueError):
    """A job the engine cannot run as asked, found with what only the engine knows: 422 naming `field`."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# Every torch call of the server runs on this ONE thread. Each thread that enters torch gets its
# own OpenMP pool, and once a process has two, every parallel region in it ran ~2.4x slower on
# this 2-core machine (measured: a toy generation 0.5 s -> 1.2 s, whichever thread ran it).
TORCH_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distillery-torch")


async def on_torch_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(TORCH_THREAD, fn, *args)


@dataclass(frozen=True)
class Job:
    prompt: str
    guidance: float
    steps: int
    seed: int
    scheduler: str = "ddim"
    adapters: tuple[tuple[str, float], ...] = ()
    height: int | None = None
    width: int | None = None
    negative_prompt: str = ""


@dataclass
class Result:
    image: object  # PIL.Image
    job: Job
    mode: str
    unet_evaluations: int
    timings_ms: dict[str, float]
    peak_memory: dict[str, float]

    @property
    def png(self) -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, format="PNG")
        return buf.getvalue()


@dataclass
class _InFlight:
    job: Job
    adapters: AdapterSet
    future: asyncio.Future
    enqueued: float
    request: Request | None = None
    started: float = 0.0
    image: object = None
    memory: MemoryTracker = field(default_factory=MemoryTracker)

    @property
    def rows(self) -> int:  # UNet rows per step: 1 single-eval, 2 CFG
        return 1 if any(a.single_eval for a, _ in self.adapters) else 2


class Engine:
    def __init__(self, model: DiffusionModel, queue_size: int = 16, timeout_s: float = 120.0, max_rows: int = 16,
                 adapter_budget_bytes: int | None = None, merged_cache_bytes: int | None = None,
                 metrics: Metrics | None = None):
        self.model = model
        self.registry = AdapterRegistry.of(model, adapter_budget_bytes, merged_cache_bytes)
        self.metrics = metrics or Metrics()
        self.timeout_s, self.max_rows, self.queue_size = timeout_s, max_rows, queue_size
        self.pending: deque[_InFlight] = deque()
        self.ready = False
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None

    @property
    def default_guidance(self) -> float:
        return float(self.model.defaults.get("guidance", 0.0))

    @property
    def default_steps(self) -> int:
        return int(self.model.defaults.get("steps", 25))

    def load_adapters_from(self, root: str | Path) -> list[str]:
        """Register every adapter folder under `root`, named after its folder; a bad one is logged and skipped."""
        loaded = []
        for meta in sorted(Path(root).glob(f"*/{META_FILE}")):
            try:
                self.registry.load(meta.parent.name, meta.parent)
                loaded.append(meta.parent.name)
            except AdapterError as exc:
                log.warning("adapter %s not loaded: %s", meta.parent, exc)
        self.metrics.observe_registry(self.registry)
        return loaded

    def resolve(self, job: Job) -> AdapterSet:
        """The job's adapters: UnknownAdapter for an unknown name, AdapterError for an unusable set or w."""
        chosen = tuple((self.registry.get(name), weight) for name, weight in job.adapters)
        check_guidance(chosen, job.guidance)
        return chosen

    async def start(self) -> None:
        await on_torch_thread(self.warmup)
        self._worker = asyncio.create_task(self._run())
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self._worker:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    def warmup(self) -> None:
        """One tiny generation per mode: first-call allocations and lazy inits happen before traffic."""
        generate(self.model, ["warm-up"], [0], 0.0, steps=2)
        for adapter in list(self.registry.resident.values()):
            generate(self.model, ["warm-up"], [0], adapter.meta.w_min, steps=1, adapters=((adapter, 1.0),))

    async def submit(self, job: Job) -> Result:
        if all(name in self.registry.resident for name, _ in job.adapters):
            chosen = self.resolve(job)
        else:  # an evicted adapter is read back from disk: torch work, so on the torch thread
            chosen = await on_torch_thread(self.resolve, job)
        if len(self.pending) >= self.queue_size:
            self.metrics.errors.labels("queue_full").inc()
            raise QueueFull(f"queue is full ({self.queue_size} waiting); retry later")
        item = _InFlight(job, chosen, asyncio.get_running_loop().create_future(), time.perf_counter())
        self.registry.acquire(chosen)  # in use from now: neither evicted nor unloaded under the request
        self.pending.append(item)
        self.metrics.queue_depth.set(len(self.pending))
        self._arrived.set()
        try:
            return await asyncio.wait_for(asyncio.shield(item.future), self.timeout_s)
        finally:
            if not item.future.done():  # timed out, or the caller was cancelled (client went away)
                item.future.cancel()

    def _admit(self, active: list[_InFlight]) -> list[_InFlight]:
        """Move pending requests in flight while their rows fit `max_rows` (one always fits); returns them."""
        rows = sum(a.rows for a in active)
        admitted = []
        while self.pending and (not active or rows + self.pending[0].rows <= self.max_rows):
            item = self.pending.popleft()
            if item.future.cancelled():
                self._close(item, "cancelled")
                continue
            item.started = time.perf_counter()
            active.append(item)
            admitted.append(item)
            rows += item.rows
        self.metrics.queue_depth.set(len(self.pending))
        return admitted

    def _start(self, items: list[_InFlight]) -> list[tuple[_InFlight, Exception]]:
        """Encode the admitted requests' prompts and make their samplers (on the torch thread)."""
        failed = []
        for item in items:
            j = item.job
            try:
                item.request = start_request(self.model, j.prompt, j.seed, j.guidance, j.steps, j.scheduler,
                                             item.adapters, height=j.height, width=j.width,
                                             negative_prompt=j.negative_prompt)
            except Exception as exc:  # noqa: BLE001 - delivered to the waiting request
                failed.append((item, exc))
        return failed

    def _step(self, active: list[_InFlight]) -> list[_InFlight]:
        """One UNet call for all in flight; returns those that finished (decoded). On the torch thread."""
        unet_step(self.model, self.registry, [a.request for a in active])
        rows = sum(a.rows for a in active)
        self.metrics.batch_rows.observe(rows)
        self.metrics.unet_evaluations.inc(rows)
        done = []
        for a in active:
            a.memory.sample()
            if a.request.sampler.done:
                a.image = finish_request(self.model, a.request)
                done.append(a)
        return done

    async def _run(self) -> None:
        active: list[_InFlight] = []
        while True:
            if not active and not self.pending:
                await self._arrived.wait()
                self._arrived.clear()
            admitted = self._admit(active)
            if admitted:
                for item, exc in await on_torch_thread(self._start, admitted):
                    active.remove(item)
                    self._close(item, "error", exc)
            for a in [a for a in active if a.future.cancelled()]:
                active.remove(a)
                self._close(a, "cancelled")
            if not active:
                continue
            try:
                done = await on_torch_thread(self._step, active)
            except Exception as exc:  # noqa: BLE001 - fail this batch's requests, keep serving
                log.exception("UNet step failed")
                for a in active:
                    self._close(a, "error", exc)
                active = []
                continue
            for a in done:
                active.remove(a)
                self._close(a, "ok")

    def _close(self, item: _InFlight, outcome: str, exc: BaseException | None = None) -> None:
        """Release the request's adapters, record it, and answer it (if anyone still waits)."""
        self.registry.release(item.adapters)
        now = time.perf_counter()
        mode = "single-eval" if item.rows == 1 else "cfg"
        self.metrics.requests.labels(mode, outcome).observe(now - item.enqueued)
        if exc is not None:
            self.metrics.errors.labels(type(exc).__name__).inc()
        if item.future.done():
            return
        if exc is not None:
            item.future.set_exception(exc)
            return
        req = item.request
        timings = {"queue": (item.started - item.enqueued) * 1e3, **req.timings_ms,
                   "total": (now - item.enqueued) * 1e3}
        timings["denoise"] = (now - item.started) * 1e3 - req.timings_ms["text_encode"] - req.timings_ms["decode"]
        self.metrics.observe_memory()
        item.future.set_result(Result(item.image, item.job, req.mode, req.unet_evaluations, timings, item.memory.peak()))
