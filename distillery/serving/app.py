"""FastAPI routes: validate, map to an engine Job, answer. No tensors here."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import secrets
import signal
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from distillery.adapters import AdapterError
from distillery.adapters.slots import SlotAdapters
from distillery.model import DiffusionModel
from distillery.sampling.guidance import EMBEDDING_DIM
from distillery.serving import a1111_api, openai_api, playground
from distillery.serving.config import API_KEY_ENV, Settings, get_settings
from distillery.serving.engine import Engine
from distillery.serving.errors import install_error_handlers, unprocessable
from distillery.serving.jobs import Job, Result, on_torch_thread
from distillery.serving.openapi import ADMIN, FAILURES, INVALID, PNG_HEADERS, Limits, install_openapi
from distillery.serving.schemas import (
    AdapterList,
    AdapterLoaded,
    GenerateJSON,
    GenerateRequest,
    Health,
    ImageRequest,
    LoadAdapterRequest,
    ModelInfo,
    Problem,
    Readiness,
    Unloaded,
)
from distillery.serving.submit import (
    DISCONNECT_POLL_S,
    check_limits,
    encoded_b64,
    info_of,
    jobs_of,
    run_jobs,
    stream_events,
)

log = logging.getLogger("distillery.app")

ONEDNN_PRIMITIVE_CACHE_CAPACITY = 256  # unless the environment sets ONEDNN_PRIMITIVE_CACHE_CAPACITY (see load())


def _exit_process(cause: BaseException) -> None:
    """The engine's worker died: stop the server (uvicorn shuts down gracefully on SIGTERM, then dies of it,
    so the exit status says so) and let the orchestrator start a fresh one."""
    log.critical("engine worker died (%r): stopping the server so that it is restarted", cause)
    os.kill(os.getpid(), signal.SIGTERM)


def _describe(adapter) -> dict:
    meta = adapter.meta
    out = {"kind": meta.kind, "rank": meta.rank, "bytes": adapter.nbytes, "recommended_steps": meta.recommended_steps,
           "recommended_scheduler": meta.recommended_scheduler, "schedulers": meta.schedulers or None,
           "steps": meta.steps or None}
    return {**out, "w_range": [meta.w_min, meta.w_max]} if adapter.single_eval else out


SSE_EVENT = {"type": "object", "required": ["event", "data"], "properties": {
    "event": {"type": "string", "enum": ["progress", "result", "error"]},
    "data": {"type": "string", "description": "JSON text: {index, step, steps}; the json answer; {status, detail}."}}}


async def generated_json(results: list[Result]) -> dict:
    """POST /generate's json answer: every image with its info, the first one also at the top level."""
    images = [{"image_png_base64": b64, "info": info_of(r)} for r, b64 in zip(results, await encoded_b64(results))]
    return {**images[0], "images": images}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        def load() -> Engine:  # on the torch thread, like all torch work (distillery/serving/engine.py says why)
            # oneDNN keeps a compiled primitive per convolution shape and batch size (1024 by default): with
            # every size and batch mix in flight that held ~100 MB more after a 2-minute soak; 256 bounds it
            # (soak rss_growth 0.107 -> 0.030, throughput unchanged). Read at the first convolution.
            os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_PRIMITIVE_CACHE_CAPACITY))
            if settings.threads:
                torch.set_num_threads(settings.threads)
            model = DiffusionModel.from_pretrained(settings.model_path, settings.device, settings.torch_dtype)
            slots = None if settings.compile == "off" else SlotAdapters(
                model.unet, EMBEDDING_DIM, settings.compile_slots, settings.compile_rank, backend=settings.compile)
            engine = Engine(model, settings.queue_size, settings.request_timeout_s, settings.max_batch_rows,
                            settings.adapter_budget_bytes, settings.merged_cache_bytes,
                            deterministic=settings.deterministic,
                            on_death=_exit_process if settings.exit_on_worker_death else None, slots=slots)
            engine.load_adapters_from(settings.adapters_root)
            if slots is not None:  # every bucket compiled before traffic, at the native size
                text = model.encode_prompts([""]).shape[1:]
                slots.warm(model.latent_shape(model.default_size, model.default_size), text, model.device, model.dtype)
            return engine

        app.state.engine = engine = await on_torch_thread(load)
        app.state.limits = Limits.of(engine.model, settings)
        engine.max_steps = app.state.limits.max_steps
        app.openapi_schema = None  # the document states the loaded model's limits from now on
        await engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="distillery", version="0.1.0", lifespan=lifespan,
                  description="Text-to-image serving for distilled diffusion models: single-evaluation guidance, "
                              "per-request adapters, step-level batching. `guidance` is w: "
                              "eps = (1 + w) eps(c) - w eps(empty).")

    install_error_handlers(app, settings)
    app.state.settings = settings

    def engine(request: Request) -> Engine:
        return request.app.state.engine

    api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="APIKey",
                                  description=f"The server's `{API_KEY_ENV}`; without one set, admin routes answer 403.")

    def admin(x_api_key: str | None = Security(api_key_header)) -> None:
        if not settings.api_key:
            raise HTTPException(status_code=403, detail=f"admin routes are disabled: start the server with {API_KEY_ENV} "
                                                        f"set (e.g. to `openssl rand -hex 32`) and send it in X-API-Key")
        given, key = ((k or "").encode("utf-8", "surrogateescape") for k in (x_api_key, settings.api_key))
        if not secrets.compare_digest(given, key):  # bytes: any header value compares, in constant time
            raise HTTPException(status_code=401, detail="admin routes need the server's key in the X-API-Key header",
                                headers={"WWW-Authenticate": 'APIKey header="X-API-Key"'})

    def jobs_for(req: ImageRequest, eng: Engine, limits: Limits) -> list[Job]:
        check_limits(limits, req.width, req.height, req.steps)
        job = Job(prompt=req.prompt, seed=0, scheduler=req.scheduler,
                  guidance=eng.default_guidance if req.guidance is None else req.guidance, steps=req.steps,
                  adapters=tuple((a.name, a.weight) for a in req.adapters),
                  height=req.height, width=req.width, negative_prompt=req.negative_prompt or "")
        return jobs_of(job, req.n, req.seed)

    @app.post("/generate", response_class=Response, responses={
        200: {"model": GenerateJSON, "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
              "description": "The image: PNG bytes (`response_format: png`) or base64 PNGs and info (`json`).",
              "headers": PNG_HEADERS},
        **FAILURES,
    })
    async def generate_image(req: GenerateRequest, request: Request, eng: Engine = Depends(engine)) -> Response:
        """`n` images (one batch). Mode: a guidance-distilled adapter in `adapters` -> single-eval (1 UNet row per
        step), otherwise cfg (2). Latency breakdown and peak memory come with every answer."""
        if req.n > 1 and req.response_format == "png":
            raise unprocessable("n", f"n: {req.n} images need response_format 'json' (allowed with png: 1)")
        results = await run_jobs(eng, jobs_for(req, eng, request.app.state.limits), request)
        if results is None:  # the client went away: its work was cancelled
            return Response(status_code=499)
        if req.response_format == "json":
            return JSONResponse(await generated_json(results))
        result = results[0]
        png = await asyncio.to_thread(lambda: result.png)  # PIL encoding: not on the event loop
        info, job = info_of(result), result.job
        headers = {"X-Seed": str(job.seed), "X-Guidance": str(job.guidance), "X-Steps": str(job.steps),
                   "X-Mode": result.mode, "X-UNet-Evaluations": str(result.unet_evaluations),
                   "X-Adapters": ",".join(n for n, _ in job.adapters),
                   "X-Peak-Memory-Bytes": str(int(result.peak_memory["peak_bytes"])),
                   "X-Peak-Memory-Kind": result.peak_memory["kind"],
                   **{f"X-Latency-{k.replace('_', '-')}-Ms": f"{v:.2f}" for k, v in result.timings_ms.items()},
                   "X-Info": json.dumps(info, separators=(",", ":"))}
        return Response(png, media_type="image/png", headers=headers)

    @app.post("/generate/stream", response_class=StreamingResponse, responses={
        200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
              "description": "Server-sent events: `progress` {index, step, steps} after each step of image `index`, "
                             "then `result` (POST /generate's json answer), or `error` {status, detail} if it fails "
                             "after the stream began."},
        **FAILURES,
    })
    async def generate_stream(req: ImageRequest, request: Request, eng: Engine = Depends(engine)) -> StreamingResponse:
        """As POST /generate, with live progress: what the playground at / shows."""
        jobs = jobs_for(req, eng, request.app.state.limits)
        events: asyncio.Queue = asyncio.Queue()
        run = asyncio.create_task(run_jobs(eng, jobs, on_step=lambda i, k, n: events.put_nowait(
            ("progress", {"index": i, "step": k, "steps": n}))))
        run.add_done_callback(lambda _: events.put_nowait(None))
        first = asyncio.ensure_future(events.get())  # refusals before any step (unknown adapter, full queue) ...
        while not first.done():  # ... answer as errors; a client gone while queued cancels its work
            await asyncio.wait({first}, timeout=DISCONNECT_POLL_S)
            if not first.done() and await request.is_disconnected():
                first.cancel(), run.cancel()
                return Response(status_code=499)
        first = first.result()
        if first is None:
            await run  # raises the refusal, answered by the error handlers; or ended without progress
        return StreamingResponse(stream_events(first, events, run, generated_json), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/adapters", response_model=AdapterList, response_model_exclude_none=True)
    async def list_adapters(eng: Engine = Depends(engine)) -> dict:
        reg = eng.registry
        return {"budget_bytes": reg.budget_bytes, "resident_bytes": reg.resident_bytes,
                "adapters": [{"name": name, "resident": name in reg.resident, "in_use": reg.in_use[name],
                              **(_describe(a) if (a := reg.resident.get(name)) else {})}
                             for name in sorted(reg.known)]}

    @app.post("/adapters", status_code=201, response_model=AdapterLoaded, dependencies=[Depends(admin)], responses={
        400: {"model": Problem, "description": "Not a usable adapter: outside the root, not safetensors, made for "
                                               "another base, or corrupt; nothing loaded."},
        **ADMIN,
        404: {"model": Problem, "description": "No adapter folder or LoRA file at that path under the adapters root."},
        409: {"model": Problem, "description": "An adapter of that name is registered already."},
        **INVALID,
    })
    async def load_adapter(req: LoadAdapterRequest, eng: Engine = Depends(engine)) -> dict:
        """Load an adapter folder, or a LoRA .safetensors file (kohya / A1111 / diffusers: a style adapter), from
        under the adapters root."""
        if req.name in eng.registry.known:
            raise HTTPException(status_code=409, detail=f"an adapter named {req.name!r} is registered already; "
                                                        f"DELETE /adapters/{req.name} first")

        def locate() -> Path:  # file system calls: off the event loop
            root = Path(settings.adapters_root).resolve()
            folder = (root / req.path).resolve()
            if not folder.is_relative_to(root):  # the pattern keeps ".." out; a symlink can still lead outside
                raise HTTPException(status_code=400, detail=f"path {req.path!r} is outside the adapters root")
            try:
                found = folder.is_dir() or (folder.suffix == ".safetensors" and folder.is_file())
            except OSError as exc:
                if exc.errno != errno.ENAMETOOLONG:
                    raise
                found = False  # a name longer than the file system allows names no folder
            if not found:
                raise HTTPException(status_code=404, detail=f"no adapter folder or .safetensors LoRA file {req.path!r} "
                                                            f"under the adapters root")
            return folder

        try:
            folder = await asyncio.to_thread(locate)
        except (ValueError, OSError, RuntimeError) as exc:  # a symlink loop, a folder it may not read, ...
            raise HTTPException(status_code=400, detail=f"path {req.path!r} is not usable: {exc}") from None
        try:
            adapter = await on_torch_thread(eng.registry.load, req.name, folder)
        except AdapterError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        return {"name": adapter.name, "kind": adapter.meta.kind, "bytes": adapter.nbytes}

    @app.delete("/adapters/{name}", response_model=Unloaded, dependencies=[Depends(admin)], responses={
        **ADMIN,
        404: {"model": Problem, "description": "No adapter of that name; the message lists those available."},
        409: {"model": Problem, "description": "Requests are using it; retry when they finish."},
    })
    async def unload_adapter(name: str, eng: Engine = Depends(engine)) -> dict:
        await on_torch_thread(eng.registry.unload, name)  # it frees tensors: the torch thread's work
        return {"unloaded": name}

    @app.get("/model", response_model=ModelInfo)
    async def model_info(request: Request, eng: Engine = Depends(engine)) -> dict:
        m, limits = eng.model, request.app.state.limits
        return {"path": settings.model_path, "fingerprint": m.fingerprint, "native_size": m.default_size,
                "size_step": limits.size_step, "max_size": limits.max_size, "max_steps": limits.max_steps,
                "default_guidance": eng.default_guidance, "default_steps": eng.default_steps}

    @app.get("/metrics", response_class=Response, responses={
        200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
              "description": "Prometheus text exposition (docs/metrics.md)."}})
    async def metrics(eng: Engine = Depends(engine)) -> Response:
        return Response(generate_latest(eng.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", response_model=Readiness, responses={
        503: {"model": Readiness, "description": "Not ready: loading, warming up, or stopping."}})
    async def readyz(request: Request) -> JSONResponse:
        eng = getattr(request.app.state, "engine", None)
        ready = bool(eng and eng.ready)
        return JSONResponse(status_code=200 if ready else 503, content={"ready": ready})

    app.include_router(playground.router)
    app.include_router(openai_api.router)
    app.include_router(a1111_api.router)
    install_openapi(app)
    return app
