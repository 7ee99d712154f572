"""FastAPI routes: validate, map to an engine Job, answer. No tensors here."""

from __future__ import annotations

import asyncio
import base64
import json
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.adapters import AdapterError
from server.config import Settings, get_settings
from server.engine import Engine, Job, QueueFull, on_torch_thread
from server.model import DiffusionModel
from server.registry import AdapterInUse, GuidanceOutOfRange, UnknownAdapter
from server.schemas import GenerateRequest, LoadAdapterRequest, describe_errors

DISCONNECT_POLL_S = 0.05


def _unprocessable(field: str, message: str) -> HTTPException:
    return HTTPException(status_code=422, detail=[{"field": field, "message": message}])


def _describe(adapter) -> dict:
    meta = adapter.meta
    out = {"kind": meta.kind, "rank": meta.rank, "bytes": adapter.nbytes, "recommended_steps": meta.recommended_steps}
    return {**out, "w_range": [meta.w_min, meta.w_max]} if adapter.single_eval else out


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        def load() -> Engine:  # on the torch thread, like all torch work (server/engine.py says why)
            if settings.threads:
                torch.set_num_threads(settings.threads)
            model = DiffusionModel.from_pretrained(settings.model_path, settings.device, getattr(torch, settings.dtype))
            engine = Engine(model, settings.queue_size, settings.request_timeout_s, settings.max_batch_rows,
                            settings.adapter_budget_bytes, settings.merged_cache_bytes)
            engine.load_adapters_from(settings.adapters_root)
            return engine

        app.state.engine = engine = await on_torch_thread(load)
        await engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="distillery", version="0.1.0", lifespan=lifespan,
                  description="Text-to-image serving for distilled diffusion models: single-evaluation guidance, "
                              "per-request adapters, step-level batching. `guidance` is w: "
                              "eps = (1 + w) eps(c) - w eps(empty).")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        schema = LoadAdapterRequest if request.url.path == "/adapters" else GenerateRequest
        return JSONResponse(status_code=422, content={"detail": describe_errors(schema, exc.errors())})

    @app.exception_handler(GuidanceOutOfRange)
    async def guidance_out_of_range(request: Request, exc: GuidanceOutOfRange):
        return JSONResponse(status_code=422, content={"detail": [{"field": "guidance", "message": str(exc)}]})

    @app.exception_handler(UnknownAdapter)
    async def unknown_adapter(request: Request, exc: UnknownAdapter):
        return JSONResponse(status_code=404, content={"detail": exc.args[0]})

    @app.exception_handler(AdapterInUse)
    async def adapter_in_use(request: Request, exc: AdapterInUse):
        return JSONResponse(status_code=409, content={"detail": str(exc)})

    @app.exception_handler(AdapterError)
    async def unusable_adapter_set(request: Request, exc: AdapterError):
        return JSONResponse(status_code=422, content={"detail": [{"field": "adapters", "message": str(exc)}]})

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull):
        return JSONResponse(status_code=429, content={"detail": str(exc)}, headers={"Retry-After": "1"})

    def engine(request: Request) -> Engine:
        return request.app.state.engine

    def admin(x_api_key: str | None = Header(default=None)) -> None:
        if settings.api_key and x_api_key != settings.api_key:
            raise HTTPException(status_code=401, detail="admin routes need the X-API-Key header")

    def to_job(req: GenerateRequest, eng: Engine) -> Job:
        model = eng.model
        step, native = model.size_step, model.default_size
        for field in ("width", "height"):
            value = getattr(req, field)
            if value is not None and (value % step or not step <= value <= 2 * native):
                raise _unprocessable(field, f"{field}: {value} is not allowed (allowed: a multiple of {step} "
                                            f"in [{step}, {2 * native}])")
        if req.steps is not None and req.steps > model.max_steps:
            raise _unprocessable("steps", f"steps: {req.steps} is more than this model's scheduler allows "
                                          f"(allowed: integer in [1, {model.max_steps}])")
        if req.negative_prompt is not None and any(eng.registry.get(a.name).single_eval for a in req.adapters):
            raise _unprocessable("negative_prompt", "negative_prompt: only in cfg mode; a guidance-distilled adapter "
                                                    "samples without the unconditional branch")
        return Job(prompt=req.prompt, seed=req.seed, scheduler=req.scheduler,
                   guidance=eng.default_guidance if req.guidance is None else req.guidance,
                   steps=req.steps or eng.default_steps, adapters=tuple((a.name, a.weight) for a in req.adapters),
                   height=req.height, width=req.width, negative_prompt=req.negative_prompt or "")

    @app.post("/generate", response_class=Response,
              responses={200: {"content": {"image/png": {}, "application/json": {}}}})
    async def generate_image(req: GenerateRequest, request: Request, eng: Engine = Depends(engine)) -> Response:
        """One image. Mode: a guidance-distilled adapter in `adapters` -> single-eval (1 UNet row per step),
        otherwise cfg (2). Latency breakdown and peak memory come with every answer."""
        job = to_job(req, eng)
        task = asyncio.create_task(eng.submit(job))
        while not task.done():  # a client that goes away cancels its work
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                return Response(status_code=499)
        result = task.result()
        png = result.png
        info = {"seed": job.seed, "guidance": job.guidance, "steps": job.steps, "mode": result.mode,
                "unet_evaluations": result.unet_evaluations, "adapters": [list(a) for a in job.adapters],
                "latency_ms": {k: round(v, 2) for k, v in result.timings_ms.items()},
                "peak_memory": result.peak_memory}
        if req.response_format == "json":
            return JSONResponse({"image_png_base64": base64.b64encode(png).decode(), "info": info})
        headers = {"X-Seed": str(job.seed), "X-Guidance": str(job.guidance), "X-Steps": str(job.steps),
                   "X-Mode": result.mode, "X-UNet-Evaluations": str(result.unet_evaluations),
                   "X-Adapters": ",".join(n for n, _ in job.adapters),
                   "X-Peak-Memory-Bytes": str(int(result.peak_memory["peak_bytes"])),
                   "X-Peak-Memory-Kind": result.peak_memory["kind"],
                   **{f"X-Latency-{k.replace('_', '-')}-Ms": f"{v:.2f}" for k, v in result.timings_ms.items()},
                   "X-Info": json.dumps(info, separators=(",", ":"))}
        return Response(png, media_type="image/png", headers=headers)

    @app.get("/adapters")
    async def list_adapters(eng: Engine = Depends(engine)) -> dict:
        reg = eng.registry
        return {"budget_bytes": reg.budget_bytes, "resident_bytes": reg.resident_bytes,
                "adapters": [{"name": name, "resident": name in reg.resident, "in_use": reg.in_use[name],
                              **(_describe(a) if (a := reg.resident.get(name)) else {})}
                             for name in sorted(reg.known)]}

    @app.post("/adapters", status_code=201, dependencies=[Depends(admin)])
    async def load_adapter(req: LoadAdapterRequest, eng: Engine = Depends(engine)) -> dict:
        """Load an adapter folder (safetensors only) from under the adapters root."""
        root = Path(settings.adapters_root).resolve()
        folder = (root / req.path).resolve()
        if not folder.is_relative_to(root):
            raise HTTPException(status_code=400, detail=f"path {req.path!r} is outside the adapters root")
        try:
            adapter = await on_torch_thread(eng.registry.load, req.name, folder)
        except AdapterError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        finally:
            eng.metrics.observe_registry(eng.registry)
        return {"name": adapter.name, "kind": adapter.meta.kind, "bytes": adapter.nbytes}

    @app.delete("/adapters/{name}", dependencies=[Depends(admin)])
    async def unload_adapter(name: str, eng: Engine = Depends(engine)) -> dict:
        eng.registry.unload(name)
        eng.metrics.observe_registry(eng.registry)
        return {"unloaded": name}

    @app.get("/model")
    async def model_info(eng: Engine = Depends(engine)) -> dict:
        m = eng.model
        return {"path": settings.model_path, "fingerprint": m.fingerprint, "native_size": m.default_size,
                "size_step": m.size_step, "default_guidance": eng.default_guidance, "default_steps": eng.default_steps}

    @app.get("/metrics")
    async def metrics(eng: Engine = Depends(engine)) -> Response:
        eng.metrics.observe_memory()
        eng.metrics.observe_registry(eng.registry)  # on-demand reloads and evictions happen between scrapes
        return Response(generate_latest(eng.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        eng = getattr(request.app.state, "engine", None)
        ready = bool(eng and eng.ready)
        return JSONResponse(status_code=200 if ready else 503, content={"ready": ready})

    return app
