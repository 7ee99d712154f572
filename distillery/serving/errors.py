"""How the server answers what went wrong: each exception's status and detail in ONE table (`failure_of`),
shaped by the API the request spoke. Each API's router module registers its shape for its path prefix
(`ErrorShapes`); the native shape, {"detail": ...}, answers everything else."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from distillery.adapters import AdapterError, AdapterInUse, UnknownAdapter
from distillery.sampling.plan import PlanRefused
from distillery.serving.jobs import EngineUnavailable, QueueFull, RequestTimeout
from distillery.serving.schemas import describe_errors

RETRY_AFTER_FULL_S = 1  # a full queue drains within a few UNet steps
RETRY_AFTER_UNAVAILABLE_S = 5  # timed out, warming up, stopping or restarting: give it longer


@dataclass(frozen=True)
class Failure:
    """What to answer: a status, a message or a list of field errors ({field, message[, code]}), headers."""

    status: int
    detail: str | list[dict]
    headers: dict[str, str] | None = None

    @property
    def fields(self) -> list[dict]:
        return self.detail if isinstance(self.detail, list) else []

    @property
    def message(self) -> str:
        return "; ".join(f["message"] for f in self.fields) if self.fields else str(self.detail)


Shape = Callable[[Failure], Response]


def unprocessable(field: str, message: str, status: int = 422, code: str | None = None) -> HTTPException:
    """A route's refusal of one field, in the shape every API turns into its own."""
    return HTTPException(status_code=status, detail=[{"field": field, "message": message, **({"code": code} if code
                                                                                                  else {})}])


def _fields(field: str, message: str) -> list[dict]:
    return [{"field": field, "message": message}]


def _retry(seconds: int) -> dict[str, str]:
    return {"Retry-After": str(seconds)}


def failure_of(exc: Exception) -> Failure | None:
    """The one table: an engine, plan or adapter exception -> what the client is told (None: not ours)."""
    if isinstance(exc, PlanRefused):
        return Failure(422, _fields(exc.field, str(exc)))
    if isinstance(exc, UnknownAdapter):
        return Failure(404, exc.args[0])
    if isinstance(exc, AdapterInUse):
        return Failure(409, str(exc))
    if isinstance(exc, AdapterError):
        return Failure(422, _fields("adapters", str(exc)))
    if isinstance(exc, QueueFull):
        return Failure(429, str(exc), _retry(RETRY_AFTER_FULL_S))
    if isinstance(exc, (RequestTimeout, EngineUnavailable)):
        return Failure(503, str(exc) or "the engine is not serving right now; retry later",
                       _retry(RETRY_AFTER_UNAVAILABLE_S))
    if isinstance(exc, StarletteHTTPException):
        return Failure(exc.status_code, exc.detail, exc.headers)
    return None


def native_shape(failure: Failure) -> JSONResponse:
    return JSONResponse(status_code=failure.status, content={"detail": failure.detail}, headers=failure.headers)


class ErrorShapes:
    """Path prefix -> the shape of that API's errors (registered by its router module)."""

    def __init__(self):
        self._by_prefix: dict[str, Shape] = {}

    def register(self, prefix: str, shape: Shape) -> None:
        self._by_prefix[prefix.rstrip("/") + "/"] = shape

    def of(self, request: Request) -> Shape | None:
        return next((s for p, s in self._by_prefix.items() if request.url.path.startswith(p)), None)


def _routes(router) -> list:
    """Every route, included routers' too (FastAPI keeps an included router as one entry; its routes carry their
    prefix already: the app includes them with none)."""
    out = []
    for route in router.routes:
        inner = getattr(route, "original_router", None)
        out += _routes(inner) if inner is not None else [route]
    return out


def install_error_handlers(app: FastAPI, shapes: ErrorShapes) -> None:
    def answer(request: Request, failure: Failure) -> Response:
        return (shapes.of(request) or native_shape)(failure)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        route = request.scope.get("route")  # the schema that refused it names the fields' allowed values
        schema = getattr(getattr(route, "body_field", None), "field_info", None)
        return answer(request, Failure(422, describe_errors(getattr(schema, "annotation", None), exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 405:  # Starlette's Allow names one route's methods; a path can have several routes
            allowed = sorted({m for r in _routes(request.app.router) if getattr(r, "methods", None)
                              and r.matches(request.scope)[0] != Match.NONE for m in r.methods})
            exc = StarletteHTTPException(405, exc.detail, headers={**(exc.headers or {}), "Allow": ", ".join(allowed)})
        if shapes.of(request) is None:
            return await http_exception_handler(request, exc)  # Starlette's: bodiless statuses stay bodiless
        return answer(request, failure_of(exc))

    async def known(request: Request, exc: Exception):
        return answer(request, failure_of(exc))

    for kind in (PlanRefused, AdapterError, UnknownAdapter, QueueFull, RequestTimeout, EngineUnavailable):
        app.add_exception_handler(kind, known)
