"""The engine: owns the model, the adapters, the bounded queue, warm-up and step-level batching.

A single worker loop takes the requests in flight (within a budget of latent pixels per call),
runs one step for all of them per iteration (pipeline.unet_step: one UNet call per latent shape
in throughput mode, one per image row in deterministic mode) and admits newcomers between
steps. Tensor work runs on one torch thread so the event loop keeps answering health checks,
metrics and overflow (429) meanwhile. A request whose client went away or timed out is dropped
at the next step. No request fails because of another: a failing step is retried request by
request, and only the request that fails alone gets the error. If the worker loop itself dies,
the engine stops being ready, answers 503, and calls `on_death` (the server exits, so the
orchestrator restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

from distillery.adapters import (META_FILE, AdapterError, AdapterRegistry, AdapterSet, check_guidance, guidance_adapter,
                                 sampling_for)
from distillery.model import DiffusionModel
from distillery.sampling.pipeline import (encode_together, finish_denoising, generate, prompts_of, start_denoising,
                                          unet_step)
from distillery.sampling.sampler import most_steps
from distillery.serving.jobs import (
    EngineUnavailable,
    InFlight,
    InvalidJob,
    Job,
    QueueFull,
    RequestTimeout,
    Result,
    on_torch_thread,
    rows_per_step,
)
from distillery.serving.memory import step_peak
from distillery.serving.metrics import Metrics

log = logging.getLogger("distillery.engine")


class Engine:
    def __init__(self, model: DiffusionModel, queue_size: int = 16, timeout_s: float = 120.0, max_rows: float = 12,
                 adapter_budget_bytes: int | None = None, merged_cache_bytes: int | None = None,
                 metrics: Metrics | None = None, deterministic: bool = False, on_death=None, slots=None):
        """`max_rows`: the latent pixels of one step's calls, in rows at the model's native size (a request
        alone always runs, whatever its size). Makes the registry: serving layers, or `slots` (compiled)."""
        self.model = model
        self.registry = AdapterRegistry(model, adapter_budget_bytes, merged_cache_bytes, slots)
        self.metrics = metrics or Metrics()
        self.timeout_s, self.max_rows, self.queue_size = timeout_s, max_rows, queue_size
        self.deterministic, self.on_death = deterministic, on_death
        self.max_steps: int | None = None  # the operator's cap on default steps
        self.pending: deque[InFlight] = deque()
        self.active: list[InFlight] = []
        self.ready, self.dead = False, None  # dead: the exception the worker loop died of, if it did
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self.metrics.watch(self.registry, self.pending)

    @property
    def default_guidance(self) -> float:
        return float(self.model.defaults.get("guidance", 0.0))

    @property
    def default_steps(self) -> int:
        """The model's steps, within the operator's cap (`max_steps`, set by the app from its limits)."""
        steps = int(self.model.defaults.get("steps", 25))
        return min(steps, self.max_steps) if self.max_steps else steps

    def load_adapters_from(self, root: str | Path) -> list[str]:
        """Register every adapter folder under `root` (named after it) and LoRA file `root/<name>.safetensors`."""
        loaded = []
        folders = [meta.parent for meta in Path(root).glob(f"*/{META_FILE}")]
        for path in sorted(folders + [*Path(root).glob("*.safetensors")]):
            try:  # a bad one is logged and skipped
                loaded.append(self.registry.load(path.stem if path.is_file() else path.name, path).name)
            except AdapterError as exc:
                log.warning("adapter %s not loaded: %s", path, exc)
        return loaded

    def resolve(self, job: Job, reload: bool = True) -> AdapterSet | None:
        """The job's adapters: UnknownAdapter for an unknown name, AdapterError for an unusable set or w,
        InvalidJob for a field the set rules out. reload=False (on the event loop): None if one was evicted."""
        found = [(self.registry.get(name) if reload else self.registry.resident_or_none(name), weight)
                 for name, weight in job.adapters]
        if any(a is None for a, _ in found):
            return None
        chosen = tuple(found)
        check_guidance(chosen, job.guidance)
        if job.negative_prompt and guidance_adapter(chosen):
            raise InvalidJob("negative_prompt", "negative_prompt: only in cfg mode; a guidance-distilled adapter "
                                                "samples without the unconditional branch")
        return chosen

    def settle(self, job: Job, chosen: AdapterSet) -> Job:
        """The job with the scheduler and steps it samples with (UnsupportedSampling, InvalidJob: not usable)."""
        scheduler, steps = sampling_for(chosen, job.scheduler, job.steps, self.default_steps)
        distilled = guidance_adapter(chosen)
        most = most_steps(scheduler, self.model.scheduler_config, distilled.meta.scheduler_config if distilled else None)
        if steps > most:
            raise InvalidJob("steps", f"steps: {steps} is more than the {scheduler} scheduler takes "
                                      f"(allowed: integer in [1, {most}])")
        return replace(job, scheduler=scheduler, steps=steps)

    def cost(self, job: Job, rows: int) -> float:
        """A job's share of a step's budget, in rows at the native size (a 2x-size image counts 4x)."""
        native = self.model.default_size
        return rows * (job.height or native) * (job.width or native) / native**2

    async def start(self) -> None:
        await on_torch_thread(self.warmup)
        self._worker = asyncio.create_task(self._run())
        self._worker.add_done_callback(self._worker_ended)
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self._worker and not self._worker.done():  # a dead worker was reported by _worker_ended
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    def warmup(self) -> None:
        """One tiny generation per mode and adapter: first-call allocations and lazy inits happen before traffic."""
        kw = dict(registry=self.registry, deterministic=self.deterministic)
        generate(self.model, ["warm-up"], [0], 0.0, steps=2, **kw)
        for adapter in list(self.registry.resident.values()):
            generate(self.model, ["warm-up"], [0], adapter.meta.w_min, steps=1, adapters=((adapter, 1.0),), **kw)

    async def submit(self, job: Job, on_step=None) -> Result:
        """The job's image (`on_step(done, steps)` after each step). Raises QueueFull, RequestTimeout,
        EngineUnavailable, UnknownAdapter, AdapterError or InvalidJob; its own steps' failure is re-raised as it was."""
        if not self.ready:
            why = f"its worker died: {self.dead!r}" if self.dead else "not ready"
            raise EngineUnavailable(f"the engine is not serving ({why}); retry later")
        chosen = self.resolve(job, reload=False)
        if chosen is None:  # an evicted adapter is read back from disk: on the torch thread
            chosen = await on_torch_thread(self.resolve, job)
        job = self.settle(job, chosen)  # what the result reports
        if len(self.pending) >= self.queue_size:
            self.metrics.errors.labels("queue_full").inc()
            raise QueueFull(f"queue is full ({self.queue_size} waiting); retry later")
        item = InFlight(job, chosen, asyncio.get_running_loop().create_future(), time.perf_counter(),
                         self.cost(job, rows_per_step(chosen)), on_step=on_step)
        self.registry.acquire(chosen)  # in use from now: neither evicted nor unloaded under the request
        self.pending.append(item)
        self._arrived.set()
        try:
            return await asyncio.wait_for(asyncio.shield(item.future), self.timeout_s)
        except TimeoutError:
            self.metrics.errors.labels("timeout").inc()
            raise RequestTimeout(f"not answered within the request timeout of {self.timeout_s} s; retry later") from None
        finally:
            if not item.future.done():  # timed out, or the caller was cancelled (client went away)
                item.future.cancel()

    def _admit(self) -> list[InFlight]:
        """Move pending requests in flight, in order, while their cost fits `max_rows` (one always fits)."""
        used = sum(a.cost for a in self.active)
        admitted = []
        while self.pending and (not self.active or used + self.pending[0].cost <= self.max_rows):
            item = self.pending.popleft()
            if item.future.cancelled():
                self._close(item, "cancelled")
                continue
            item.started = time.perf_counter()
            self.active.append(item)
            admitted.append(item)
            used += item.cost
        return admitted

    def _start(self, items: list[InFlight]) -> list[tuple[InFlight, Exception]]:
        """Encode the admitted requests' prompts (throughput mode: in one text-encoder call) and make their
        samplers (on the torch thread)."""
        encoded = [None] * len(items)
        if not self.deterministic and len(items) > 1:
            try:
                texts, ms = encode_together(self.model, [prompts_of(i.job.prompt, i.adapters, i.job.negative_prompt)
                                                         for i in items])
                encoded = [(text, ms) for text in texts]
            except Exception:  # noqa: BLE001 - each request encodes alone below, and fails alone
                log.exception("encoding %d prompts together failed; encoding them one by one", len(items))
        failed = []
        for item, enc in zip(items, encoded):
            j = item.job
            try:
                item.denoising = start_denoising(self.model, j.prompt, j.seed, j.guidance, j.steps, j.scheduler,
                                             item.adapters, height=j.height, width=j.width,
                                             negative_prompt=j.negative_prompt, encoded=enc, eta=j.eta)
            except Exception as exc:  # noqa: BLE001 - delivered to the waiting request
                failed.append((item, exc))
        return failed

    def _step(self, active: list[InFlight]) -> tuple[list[InFlight], list[tuple[InFlight, Exception]]]:
        """One step for all in flight (on the torch thread): (finished and decoded, failed). If a shared
        UNet call fails (nothing has advanced then), each request steps alone, and only those that fail
        alone fail."""
        try:
            failed = self._unet_step(active)
        except Exception:  # noqa: BLE001 - find the request that fails alone
            log.exception("a batched step failed; stepping its %d requests one by one", len(active))
            failed = []
            for a in active:
                try:
                    failed += self._unet_step([a])
                except Exception as exc:  # noqa: BLE001
                    failed.append((a, exc))
        finished = [a for a in active if a.denoising.sampler.done and not any(a is f for f, _ in failed)]
        try:
            images = finish_denoising(self.model, [a.denoising for a in finished], together=not self.deterministic)
        except Exception:  # noqa: BLE001 - decode one by one: only a request that fails alone fails
            images = []
            for a in finished:
                try:
                    images += finish_denoising(self.model, [a.denoising])
                except Exception as exc:  # noqa: BLE001
                    images.append(None)
                    failed.append((a, exc))
        for a, image in zip(finished, images):
            a.image = image
        peak = step_peak()  # this step's and its decode's: every request in the batch had its share in it
        for a in active:
            a.memory.sample(peak)
        return [a for a in finished if a.image is not None], failed

    def _unet_step(self, items: list[InFlight]) -> list[tuple[InFlight, Exception]]:
        """unet_step over the items; returns the items whose own scheduler step failed."""
        failed = unet_step(self.model, self.registry, [a.denoising for a in items], self.deterministic)
        rows = sum(a.rows for a in items)
        self.metrics.batch_rows.observe(rows)
        self.metrics.unet_evaluations.inc(rows)
        return [(next(a for a in items if a.denoising is den), exc) for den, exc in failed]

    async def _run(self) -> None:
        while True:
            if not self.active and not self.pending:
                await self._arrived.wait()
                self._arrived.clear()
            admitted = self._admit()
            if admitted:
                for item, exc in await on_torch_thread(self._start, admitted):
                    self.active.remove(item)
                    self._close(item, "error", exc)
            for a in [a for a in self.active if a.future.cancelled()]:
                self.active.remove(a)
                self._close(a, "cancelled")
            if not self.active:
                continue
            done, failed = await on_torch_thread(self._step, list(self.active))
            for a, exc in failed:
                self.active.remove(a)
                self._close(a, "error", exc)
            for a in self.active:
                a.report_step()
            for a in done:
                self.active.remove(a)
                self._close(a, "ok")

    def _worker_ended(self, task: asyncio.Task) -> None:
        """The worker loop ends only when stopped; anything else is a bug: stop serving, fail everything
        waiting with 503, log, and let `on_death` (the server: exit) restart us cleanly."""
        if task.cancelled():
            return
        self.dead = task.exception() or RuntimeError("the worker loop returned")
        self.ready = False
        log.critical("engine worker died; not ready from now on", exc_info=self.dead)
        for item in self.active + list(self.pending):
            if not item.future.done():
                item.future.set_exception(EngineUnavailable(f"the engine's worker died: {self.dead!r}; retry later"))
        self.active.clear()
        self.pending.clear()
        if self.on_death is not None:
            self.on_death(self.dead)

    def _close(self, item: InFlight, outcome: str, exc: BaseException | None = None) -> None:
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
        den = item.denoising
        timings = {"queue": (item.started - item.enqueued) * 1e3, **den.timings_ms,
                   "total": (now - item.enqueued) * 1e3}
        timings["denoise"] = (now - item.started) * 1e3 - den.timings_ms["text_encode"] - den.timings_ms["decode"]
        item.future.set_result(Result(item.image, item.job, den.mode, den.unet_evaluations, timings, item.memory.peak()))
