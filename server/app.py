"""FastAPI routes: validate, map to an engine Job, return the image. No tensors here."""

from __future__ import annotations

import io
from contextlib import asynccontextmanager

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from server.config import Settings, get_settings
from server.adapters import AdapterError
from server.engine import Engine, Job, QueueFull
from server.model import DiffusionModel
from server.registry import GuidanceOutOfRange, UnknownAdapter
from server.schemas import GenerateRequest, describe_errors


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.threads:
            torch.set_num_threads(settings.threads)
        model = DiffusionModel.from_pretrained(settings.model_path, settings.device, getattr(torch, settings.dtype))
        engine = Engine(model, settings.queue_size, settings.request_timeout_s)
        engine.load_adapters_from(settings.adapters_root)
        app.state.engine = engine
        await engine.start()
        yield
        await app.state.engine.stop()

    app = FastAPI(title="distillery", version="0.1.0", lifespan=lifespan,
                  description="Text-to-image serving for distilled diffusion models.")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return JSONResponse(status_code=422, content={"detail": describe_errors(GenerateRequest, exc.errors())})

    @app.exception_handler(GuidanceOutOfRange)
    async def guidance_out_of_range(request: Request, exc: GuidanceOutOfRange):
        return JSONResponse(status_code=422, content={"detail": [{"field": "guidance", "message": str(exc)}]})

    @app.exception_handler(UnknownAdapter)
    async def unknown_adapter(request: Request, exc: UnknownAdapter):
        return JSONResponse(status_code=404, content={"detail": exc.args[0]})

    @app.exception_handler(AdapterError)
    async def bad_adapter_set(request: Request, exc: AdapterError):
        return JSONResponse(status_code=422, content={"detail": [{"field": "adapters", "message": str(exc)}]})

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull):
        return JSONResponse(status_code=429, content={"detail": str(exc)}, headers={"Retry-After": "1"})

    def engine(request: Request) -> Engine:
        return request.app.state.engine

    @app.post("/generate", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def generate_image(req: GenerateRequest, eng: Engine = Depends(engine)) -> Response:
        """Generate one image. `guidance` is w: eps = (1 + w) eps(c) - w eps(empty)."""
        job = Job(prompt=req.prompt, seed=req.seed, scheduler=req.scheduler,
                  guidance=eng.default_guidance if req.guidance is None else req.guidance,
                  steps=req.steps or eng.default_steps, adapters=tuple((a.name, a.weight) for a in req.adapters))
        result = await eng.submit(job)
        buf = io.BytesIO()
        result.generated.images[0].save(buf, format="PNG")
        headers = {"X-Seed": str(job.seed), "X-Guidance": str(job.guidance), "X-Steps": str(job.steps),
                   "X-Mode": result.generated.mode, "X-Adapters": ",".join(n for n, _ in job.adapters),
                   "X-UNet-Evaluations": str(result.generated.unet_evaluations),
                   **{f"X-Latency-{k.replace('_', '-')}-Ms": f"{v:.1f}" for k, v in result.timings_ms.items()}}
        return Response(buf.getvalue(), media_type="image/png", headers=headers)

    @app.get("/adapters")
    async def list_adapters(eng: Engine = Depends(engine)) -> dict:
        return {"adapters": [{"name": a.name, "kind": a.meta.kind, "w_range": [a.meta.w_min, a.meta.w_max],
                              "rank": a.meta.rank, "recommended_steps": a.meta.recommended_steps}
                             for a in eng.registry.adapters.values()]}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        eng = getattr(request.app.state, "engine", None)
        ready = bool(eng and eng.ready)
        return JSONResponse(status_code=200 if ready else 503, content={"ready": ready})

    return app
