"""How the server answers what went wrong: each engine or adapter exception mapped to its status and body."""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from distillery.adapters import AdapterError, AdapterInUse, GuidanceOutOfRange, UnknownAdapter, UnsupportedSampling
from distillery.serving.config import Settings
from distillery.serving.jobs import EngineUnavailable, InvalidJob, QueueFull, RequestTimeout
from distillery.serving.schemas import GenerateRequest, LoadAdapterRequest, describe_errors

RETRY_AFTER_FULL_S = 1  # a full queue drains within a few UNet steps
RETRY_AFTER_UNAVAILABLE_S = 5  # timed out, warming up, stopping or restarting: give it longer


def unprocessable(field: str, message: str) -> HTTPException:
    return HTTPException(status_code=422, detail=[{"field": field, "message": message}])


def problem(status: int, detail: str, retry_after_s: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return JSONResponse(status_code=status, content={"detail": detail}, headers=headers)


def install_error_handlers(app: FastAPI, settings: Settings) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        schema = {"/adapters": LoadAdapterRequest, "/generate": GenerateRequest}.get(request.url.path)
        return JSONResponse(status_code=422, content={"detail": describe_errors(schema, exc.errors())})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 405:  # Starlette's Allow names one route's methods; a path can have several routes
            allowed = sorted({m for r in request.app.router.routes if getattr(r, "methods", None)
                              and r.matches(request.scope)[0] != Match.NONE for m in r.methods})
            exc = StarletteHTTPException(405, exc.detail, headers={**(exc.headers or {}), "Allow": ", ".join(allowed)})
        return await http_exception_handler(request, exc)

    @app.exception_handler(InvalidJob)
    async def invalid_job(request: Request, exc: InvalidJob):
        return JSONResponse(status_code=422, content={"detail": [{"field": exc.field, "message": str(exc)}]})

    @app.exception_handler(GuidanceOutOfRange)
    async def guidance_out_of_range(request: Request, exc: GuidanceOutOfRange):
        return JSONResponse(status_code=422, content={"detail": [{"field": "guidance", "message": str(exc)}]})

    @app.exception_handler(UnsupportedSampling)
    async def unsupported_sampling(request: Request, exc: UnsupportedSampling):
        return JSONResponse(status_code=422, content={"detail": [{"field": exc.field, "message": str(exc)}]})

    @app.exception_handler(UnknownAdapter)
    async def unknown_adapter(request: Request, exc: UnknownAdapter):
        return problem(404, exc.args[0])

    @app.exception_handler(AdapterInUse)
    async def adapter_in_use(request: Request, exc: AdapterInUse):
        return problem(409, str(exc))

    @app.exception_handler(AdapterError)
    async def unusable_adapter_set(request: Request, exc: AdapterError):
        return JSONResponse(status_code=422, content={"detail": [{"field": "adapters", "message": str(exc)}]})

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull):
        return problem(429, str(exc), RETRY_AFTER_FULL_S)

    @app.exception_handler(RequestTimeout)
    async def request_timeout(request: Request, exc: RequestTimeout):
        return problem(503, str(exc) or f"not answered within {settings.request_timeout_s} s; retry later",
                        RETRY_AFTER_UNAVAILABLE_S)

    @app.exception_handler(EngineUnavailable)
    async def engine_unavailable(request: Request, exc: EngineUnavailable):
        return problem(503, str(exc) or "the engine is not serving right now; retry later", RETRY_AFTER_UNAVAILABLE_S)

