"""The engine: owns the model, the adapters, the queue (admission.py) and the stepping (stepping.py).

A single worker loop admits waiting requests between steps (within a budget of latent pixels per
call), runs one step for all of them per iteration and answers those that finish. Tensor work runs
on one torch thread so the event loop keeps answering health checks, metrics and overflow (429)
meanwhile. A request whose client went away or timed out is dropped at the next step. If the worker
loop itself dies, the engine stops being ready, answers 503, and calls `on_death` (the server exits,
so the orchestrator restarts it).

What routes may use: `submit_all`, `results`, `submit`, `planned`, `limits`, `fingerprint`, `adapters`, `load_adapter`,
`unload_adapter`, `ready`, `metrics`. Nothing else (tests/test_layout.py checks the routes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from distillery.adapters import META_FILE, AdapterError, AdapterRegistry, AdapterSet, LoadedAdapter, OtherBase
from distillery.adapters.backends import SlotAdapters
from distillery.model import DiffusionModel
from distillery.sampling.guidance import EMBEDDING_DIM, guidance_embedding
from distillery.sampling.pipeline import finish_denoising, start_denoising, unet_step
from distillery.sampling.plan import (DEFAULT_SCHEDULER, Ask, ModelLimits, PlanRefused, SamplingPlan, check_cost,
                                      distilled_adapter, plan_sampling)
from distillery.serving.admission import Admission
from distillery.serving.config import Settings
from distillery.serving.jobs import (EngineUnavailable, InFlight, Job, QueueFull, RequestTimeout, Result,
                                    on_torch_thread)
from distillery.serving.metrics import Metrics
from distillery.serving.stepping import Stepping, result_of

log = logging.getLogger("distillery.engine")

# oneDNN keeps a compiled primitive per convolution shape and batch size (1024 by default): with every size and
# batch mix in flight that held ~100 MB more after a 2-minute soak; 256 bounds it (soak rss_growth 0.107 -> 0.030,
# throughput unchanged). Read at the first convolution; the environment's own value wins.
ONEDNN_PRIMITIVE_CACHE_CAPACITY = 256
DISCONNECT_POLL_S = 0.05  # how often a waiting request checks that its client is still there


class Engine:
    def __init__(self, model: DiffusionModel, queue_size: int = 16, timeout_s: float = 120.0, max_rows: float = 12,
                 adapter_budget_bytes: int | None = None, merged_cache_bytes: int | None = None,
                 metrics: Metrics | None = None, deterministic: bool = False, on_death=None, slots=None,
                 limits: ModelLimits | None = None, lora_backend: str = "auto"):
        """`max_rows`: the latent pixels of one step's calls, in rows at the model's native size. Makes the
        registry: serving layers, and `slots` (compiled). `limits`: default the model's own, no operator cap.
        `lora_backend`: "auto" (timed at warm-up) or the one forced."""
        self.model = model
        self.limits = limits or ModelLimits.of(model)
        self.registry = AdapterRegistry(model, adapter_budget_bytes, merged_cache_bytes, slots,
                                        check=self.check_sampling)
        self.metrics = metrics or Metrics()
        self.timeout_s, self.deterministic, self.on_death = timeout_s, deterministic, on_death
        self.lora_backend = lora_backend
        self.admission = Admission(queue_size, max_rows)
        self.stepping = Stepping(model, self.registry, self.metrics, deterministic)
        self.active: list[InFlight] = []
        self.ready, self.dead = False, None  # dead: the exception the worker loop died of, if it did
        self.draining = False  # shutting down: what is in flight finishes, nothing new is taken
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self.metrics.watch(self.registry, self.admission)

    @classmethod
    def from_settings(cls, settings: Settings, on_death=None) -> Engine:
        """Load the model, make the serving layers (or the compiled slots), load the adapters root: everything
        before warm-up (`start`). On the torch thread, like all torch work (jobs.TORCH_THREAD says why)."""
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_PRIMITIVE_CACHE_CAPACITY))
        if settings.threads:
            torch.set_num_threads(settings.threads)
        model = DiffusionModel.from_pretrained(settings.model_path, settings.device, settings.torch_dtype)
        slots = None if settings.compile == "off" else SlotAdapters(
            model.unet, EMBEDDING_DIM, settings.compile_slots, settings.compile_rank, backend=settings.compile,
            background=True)  # new image sizes compile beside the serving, never on its thread
        engine = cls(model, settings.queue_size, settings.request_timeout_s, settings.max_batch_rows,
                     settings.adapter_budget_bytes, settings.merged_cache_bytes, deterministic=settings.deterministic,
                     on_death=on_death, slots=slots,
                     limits=ModelLimits.of(model, settings.max_steps, settings.max_request_cost),
                     lora_backend=settings.adapter_backend)
        engine.load_adapters_from(settings.adapters_root)
        if slots is not None:  # every bucket compiled before traffic, at the native size
            native = model.default_size
            slots.warm(model.latent_shape(native, native), model.encode_prompts([""]).sized(native, native))
        return engine

    def choose_lora_backends(self, forced: str, rows: float) -> dict:
        """Time the LoRA backends on one UNet call of `rows` rows at the native size (registry.choose; `forced`:
        the operator's, untimed), with the adapters loaded by then; `warmup` does, first. What GET /model reports."""
        model, native, n = self.model, self.limits.native_size, max(1, int(rows))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, *model.latent_shape(native, native), generator=g).to(model.device, model.dtype)
        t = torch.randint(1, 1000, (n,), generator=g).to(model.device)
        cond = model.encode_prompts([""]).sized(native, native).repeat(n)
        w_emb = guidance_embedding(torch.rand(n, generator=g) * 5).to(model.device, model.dtype)  # (n, E)
        return self.registry.choose(forced, (x, t, cond, w_emb)).report()

    def lora_backends(self) -> dict:
        """Which LoRA backend runs one-set and mixed calls, with the start-up timings (GET /model)."""
        return self.registry.choice.report()

    # ---- adapters, as routes see them

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    def check_sampling(self, adapter: LoadedAdapter) -> None:
        """An adapter's own sampling (recommended scheduler and steps, each scheduler it allows) planned as a request
        naming nothing else would be: refused at load, naming its file and field, not at every request using it.
        The plan stays the one home of scheduler names and step caps (adapters cannot import it)."""
        meta = adapter.meta
        guidance = meta.w_min if adapter.single_eval else None  # within the range the plan checks
        asked = {"recommended_scheduler": meta.recommended_scheduler,
                 **{f"schedulers[{i}]": name for i, name in enumerate(meta.schedulers)}}
        where = adapter.path / META_FILE if adapter.path.is_dir() else adapter.path
        for field, scheduler in asked.items():
            try:
                plan_sampling(self.limits, ((adapter, 1.0),), Ask(guidance=guidance, scheduler=scheduler))
            except PlanRefused as exc:
                field = "recommended_steps" if exc.field == "steps" else field
                raise AdapterError(f"{where}: {field}: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - a scheduler_config the scheduler cannot take
                raise AdapterError(f"{where}: scheduler_config: the {scheduler} scheduler cannot be made with it: "
                                   f"{type(exc).__name__}: {exc}") from None

    def load_adapters_from(self, root: str | Path) -> list[str]:
        """Register every adapter folder under `root` (named after it) and LoRA file `root/<name>.safetensors`."""
        loaded = []
        folders = [meta.parent for meta in Path(root).glob(f"*/{META_FILE}")]
        for path in sorted(folders + [*Path(root).glob("*.safetensors")]):
            try:  # a bad one is logged and skipped
                loaded.append(self.registry.load(path.stem if path.is_file() else path.name, path).name)
            except OtherBase as exc:  # expected in a root shared by several bases (the shipped one is)
                log.info("adapter %s skipped: %s", path, exc)
            except AdapterError as exc:
                log.warning("adapter %s not loaded: %s", path, exc)
        return loaded

    def load_adapter(self, name: str, path: Path) -> dict:
        """Register an adapter folder or LoRA file (on the torch thread): its name, kind and bytes."""
        adapter = self.registry.load(name, path)
        return {"name": adapter.name, "kind": adapter.meta.kind, "bytes": adapter.nbytes}

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter (on the torch thread: it frees tensors); AdapterInUse while requests use it."""
        self.registry.unload(name)

    def has_adapter(self, name: str) -> bool:
        return name in self.registry.known

    def adapters(self) -> dict:
        """Every registered adapter, resident or evicted, with what a client needs to use it (GET /adapters)."""
        reg = self.registry
        listed = [{"name": name, "path": str(path), "resident": adapter is not None, "in_use": in_use,
                   **(describe(adapter) if adapter is not None else {})}
                  for name, path, adapter, in_use in reg.entries()]
        return {"budget_bytes": reg.budget_bytes, "resident_bytes": reg.resident_bytes, "adapters": listed}

    # ---- requests

    def plan(self, job: Job, reload: bool = True) -> tuple[Job, AdapterSet, SamplingPlan] | None:
        """The job settled by the plan, its adapters and its plan; UnknownAdapter or PlanRefused if it cannot run.
        reload=False (on the event loop): None if one of its adapters was evicted (read back on the torch thread)."""
        found = [(self.registry.get(name) if reload else self.registry.resident_or_none(name), weight)
                 for name, weight in job.adapters]
        if any(a is None for a, _ in found):
            return None
        chosen = tuple(found)
        plan = plan_sampling(self.limits, chosen, Ask(job.guidance, job.steps, job.scheduler, job.width, job.height,
                                                      job.negative_prompt, job.guidance_rescale))
        return (replace(job, guidance=plan.guidance, steps=plan.steps, scheduler=plan.scheduler,
                        guidance_rescale=plan.guidance_rescale), chosen, plan)

    async def planned(self, job: Job) -> tuple[Job, AdapterSet, SamplingPlan]:
        """`plan` from the event loop: an evicted adapter is read back on the torch thread."""
        return self.plan(job, reload=False) or await on_torch_thread(self.plan, job)

    async def submit_all(self, jobs: list[Job], on_step=None) -> list[InFlight]:
        """Queue a request's jobs, all or none: every refusal (QueueFull, EngineUnavailable, UnknownAdapter,
        AdapterError, PlanRefused) comes before anything is queued. `on_step(i, done, steps)`: job i's progress.
        Wait for them with `results`."""
        if not self.ready:
            why = f"its worker died: {self.dead!r}" if self.dead else "shutting down" if self.draining else "not ready"
            raise EngineUnavailable(f"the engine is not serving ({why}); retry later")
        planned = [await self.planned(job) for job in jobs]
        check_cost(self.limits, [plan for _, _, plan in planned])
        if len(self.admission) + len(jobs) > self.admission.queue_size:
            self.metrics.errors.labels("queue_full").inc()
            raise QueueFull(f"queue is full ({len(self.admission)} of {self.admission.queue_size} images waiting, "
                            f"{len(jobs)} asked); retry later")
        loop, now = asyncio.get_running_loop(), time.perf_counter()
        items = [InFlight(job, plan, chosen, loop.create_future(), now, plan.step_cost(self.limits.native_size),
                          on_step=on_step and partial(on_step, i)) for i, (job, chosen, plan) in enumerate(planned)]
        for item in items:
            self.registry.acquire(item.adapters)  # in use from now: neither evicted nor unloaded under the request
            self.admission.enqueue(item)
        self._arrived.set()
        return items

    async def results(self, items: list[InFlight], disconnected=None) -> list[Result] | None:
        """The items' results, in order, within ONE request timeout for them all. The first failure cancels the
        others and is raised; `disconnected()` (an async check: the client went away) true cancels them: None."""
        futures = [item.future for item in items]
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        try:
            while not all(f.done() for f in futures):
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    self.metrics.errors.labels("timeout").inc()
                    raise RequestTimeout(f"not answered within the request timeout of {self.timeout_s} s; retry later")
                await asyncio.wait(futures, timeout=min(left, DISCONNECT_POLL_S) if disconnected else left,
                                   return_when=asyncio.FIRST_EXCEPTION)
                if failed := next((f for f in futures if f.done() and not f.cancelled() and f.exception()), None):
                    raise failed.exception()
                if disconnected is not None and await disconnected():
                    return None
            return [f.result() for f in futures]
        finally:
            for item in items:
                if not item.future.done():  # timed out, failed, or the caller went away
                    item.future.cancel()
                    if self.admission.withdraw(item):  # still waiting: it leaves the line now, not when reached
                        self._close(item, "cancelled")

    async def submit(self, job: Job, on_step=None) -> Result:
        """One job's image (`on_step(done, steps)` after each step); refusals and failures as `submit_all`."""
        items = await self.submit_all([job], on_step and (lambda _, done, steps: on_step(done, steps)))
        return (await self.results(items))[0]

    # ---- lifecycle

    async def start(self) -> None:
        await on_torch_thread(self.warmup)
        self._worker = asyncio.create_task(self._run())
        self._worker.add_done_callback(self._worker_ended)
        self.ready = True

    def drain(self) -> None:
        """Take nothing new (503); what is queued or in flight goes on to its answer."""
        self.draining, self.ready = True, False

    async def stop(self) -> None:
        self.ready = False
        if self._worker and not self._worker.done():  # a dead worker was reported by _worker_ended
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    def warmup(self) -> None:
        """One one-step image per mode and adapter at the native size: first-call allocations and lazy inits happen
        before traffic. (Made by hand, not planned: a step-distilled adapter's own step counts need not include 1.)
        First the LoRA backends are chosen (timed on the adapters loaded by now) unless they were already; in
        deterministic mode only when forced: the fixed rule, so that no image's bits hang on a start-up timing."""
        if self.registry.measured is None and not (self.deterministic and self.lora_backend == "auto"):
            self.choose_lora_backends(self.lora_backend, self.admission.max_rows)
        native = self.limits.native_size
        for chosen in [(), *(((adapter, 1.0),) for adapter in list(self.registry.resident.values()))]:
            distilled = distilled_adapter(chosen)
            meta = distilled.meta if distilled else None
            plan = SamplingPlan(meta.w_min if meta else 0.0, 1, (meta.schedulers or [meta.recommended_scheduler])[0]
                                if meta else DEFAULT_SCHEDULER, distilled is not None, native, native,
                                scheduler_overrides=dict(meta.scheduler_config) if meta else {})
            denoising = [start_denoising(self.model, "warm-up", 0, plan, chosen)]
            unet_step(self.model, self.registry, denoising, self.deterministic)
            finish_denoising(self.model, denoising)

    async def _run(self) -> None:
        while True:
            if not self.active and not len(self.admission):
                await self._arrived.wait()
                self._arrived.clear()
            admitted, cancelled = self.admission.admit(self.active)
            for item in cancelled:
                self._close(item, "cancelled")
            if admitted:
                for item, exc in await on_torch_thread(self.stepping.start, admitted):
                    self.active.remove(item)
                    self._close(item, "error", exc)
            for item in [a for a in self.active if a.future.cancelled()]:
                self.active.remove(item)
                self._close(item, "cancelled")
            if not self.active:
                continue
            done, failed = await on_torch_thread(self.stepping.step, list(self.active))
            for item, exc in failed:
                self.active.remove(item)
                self._close(item, "error", exc)
            for item in self.active:
                item.report_step()
            for item in done:
                self.active.remove(item)
                self._close(item, "ok")

    def _worker_ended(self, task: asyncio.Task) -> None:
        """The worker loop ends only when stopped; anything else is a bug: stop serving, fail everything
        waiting with 503, log, and let `on_death` (the server: exit) restart us cleanly."""
        if task.cancelled():
            return
        self.dead = task.exception() or RuntimeError("the worker loop returned")
        self.ready = False
        log.critical("engine worker died; not ready from now on", exc_info=self.dead)
        for item in self.active + self.admission.drain():
            if not item.future.done():
                item.future.set_exception(EngineUnavailable(f"the engine's worker died: {self.dead!r}; retry later"))
        self.active.clear()
        if self.on_death is not None:
            self.on_death(self.dead)

    def _close(self, item: InFlight, outcome: str, exc: BaseException | None = None) -> None:
        """Release the request's adapters, record it, and answer it (if anyone still waits)."""
        self.registry.release(item.adapters)
        now = time.perf_counter()
        self.metrics.requests.labels(item.plan.mode, outcome).observe(now - item.enqueued)
        if exc is not None:
            self.metrics.errors.labels(type(exc).__name__).inc()
        if item.future.done():
            return
        if exc is not None:
            item.future.set_exception(exc)
        else:
            item.future.set_result(result_of(item, now))


def describe(adapter: LoadedAdapter) -> dict:
    """What GET /adapters tells of a resident adapter; the w range for the w-conditioned ones only."""
    meta = adapter.meta
    out = {"kind": meta.kind, "rank": meta.rank, "bytes": adapter.nbytes, "recommended_steps": meta.recommended_steps,
           "recommended_scheduler": meta.recommended_scheduler, "schedulers": meta.schedulers or None,
           "steps": meta.steps or None}
    return {**out, "w_range": [meta.w_min, meta.w_max]} if adapter.single_eval else out

