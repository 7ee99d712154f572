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
from distillery.serving.schemas import describe_errors

RETRY_AFTER_FULL_S = 1  # a full queue drains within a few UNet steps
RETRY_AFTER_UNAVAILABLE_S = 5  # timed out, warming up, stopping or restarting: give it longer
HTTP_REASONS = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed", 409: "Conflict",
                422: "RequestValidationError", 429: "TooManyRequests", 503: "ServiceUnavailable"}
# The engine's field names as an API calls them (OpenAI's extensions use the native names)
A1111_FIELDS = {"guidance": "cfg_scale", "scheduler": "sampler_name"}  # cfg_scale = 1 + w


def unprocessable(field: str, message: str, status: int = 422, code: str | None = None) -> HTTPException:
    error = {"field": field, "message": message, **({"code": code} if code else {})}
    return HTTPException(status_code=status, detail=[error])


def answer(request: Request, status: int, detail: str | list[dict], headers: dict | None = None) -> JSONResponse:
    """An error in the shape of the API the request spoke: `detail` is a message or a list of field errors
    ({field, message}). Native: {"detail": ...}. OpenAI (/v1/): {"error": {message, type, param, code}}, 400 for
    invalid fields as OpenAI answers them. A1111 (/sdapi/): its API's {"error", "detail", "body", "errors"}."""
    path = request.url.path
    fields = detail if isinstance(detail, list) else []
    message = "; ".join(f["message"] for f in fields) if fields else str(detail)
    if path.startswith("/v1/"):
        kind = ("invalid_request_error" if status < 429 else "rate_limit_error" if status == 429 else "server_error")
        error = {"message": message, "type": kind, "param": fields[0]["field"] if fields else None,
                 "code": fields[0].get("code") if fields else None}
        return JSONResponse(status_code=400 if status == 422 else status, content={"error": error}, headers=headers)
    if path.startswith("/sdapi/"):
        detail = [{**f, "field": A1111_FIELDS.get(f["field"], f["field"])} for f in fields] or detail
        error = {"error": HTTP_REASONS.get(status, "Error"), "detail": detail, "body": "", "errors": message}
        return JSONResponse(status_code=status, content=error, headers=headers)
    return JSONResponse(status_code=status, content={"detail": detail}, headers=headers)


def problem(request: Request, status: int, detail: str, retry_after_s: int | None = None) -> JSONResponse:
    return answer(request, status, detail, {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None)


def install_error_handlers(app: FastAPI, settings: Settings) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        route = request.scope.get("route")  # the schema that refused it names the fields' allowed values
        schema = getattr(getattr(route, "body_field", None), "field_info", None)
        return answer(request, 422, describe_errors(getattr(schema, "annotation", None), exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 405:  # Starlette's Allow names one route's methods; a path can have several routes
            allowed = sorted({m for r in request.app.router.routes if getattr(r, "methods", None)
                              and r.matches(request.scope)[0] != Match.NONE for m in r.methods})
            exc = StarletteHTTPException(405, exc.detail, headers={**(exc.headers or {}), "Allow": ", ".join(allowed)})
        if request.url.path.startswith(("/v1/", "/sdapi/")):
            return answer(request, exc.status_code, exc.detail, exc.headers)
        return await http_exception_handler(request, exc)

    def fields(field: str, message: str) -> list[dict]:
        return [{"field": field, "message": message}]

    @app.exception_handler(InvalidJob)
    async def invalid_job(request: Request, exc: InvalidJob):
        return answer(request, 422, fields(exc.field, str(exc)))

    @app.exception_handler(GuidanceOutOfRange)
    async def guidance_out_of_range(request: Request, exc: GuidanceOutOfRange):
        return answer(request, 422, fields("guidance", str(exc)))

    @app.exception_handler(UnsupportedSampling)
    async def unsupported_sampling(request: Request, exc: UnsupportedSampling):
        return answer(request, 422, fields(exc.field, str(exc)))

    @app.exception_handler(UnknownAdapter)
    async def unknown_adapter(request: Request, exc: UnknownAdapter):
        return problem(request, 404, exc.args[0])

    @app.exception_handler(AdapterInUse)
    async def adapter_in_use(request: Request, exc: AdapterInUse):
        return problem(request, 409, str(exc))

    @app.exception_handler(AdapterError)
    async def unusable_adapter_set(request: Request, exc: AdapterError):
        return answer(request, 422, fields("adapters", str(exc)))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull):
        return problem(request, 429, str(exc), RETRY_AFTER_FULL_S)

    @app.exception_handler(RequestTimeout)
    async def request_timeout(request: Request, exc: RequestTimeout):
        return problem(request, 503, str(exc) or f"not answered within {settings.request_timeout_s} s; retry later",
                       RETRY_AFTER_UNAVAILABLE_S)

    @app.exception_handler(EngineUnavailable)
    async def engine_unavailable(request: Request, exc: EngineUnavailable):
        return problem(request, 503, str(exc) or "the engine is not serving right now; retry later",
                       RETRY_AFTER_UNAVAILABLE_S)
