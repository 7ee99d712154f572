"""The OpenAPI document: what each route answers besides success, and the loaded model's limits stated in it."""

from __future__ import annotations

import json

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from distillery.sampling.plan import ModelLimits
from distillery.serving.config import API_KEY_ENV
from distillery.serving.schemas import MAX_SEED, InvalidFields, Problem


RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "required": True,
                               "schema": {"type": "integer", "minimum": 0}}}
INVALID = {422: {"model": InvalidFields, "description": "Invalid fields: each named, with the value and what is "
                                                        "allowed."}}
FAILURES = {  # what any generation route may answer besides its images
    400: {"model": Problem, "description": "The body cannot be read as JSON text (not UTF-8, say)."},
    404: {"model": Problem, "description": "An unknown adapter; the message lists those available."},
    413: {"model": Problem, "description": "The body is larger than the server takes (`DISTILLERY_MAX_BODY_BYTES`)."},
    **INVALID,
    429: {"model": Problem, "description": "The queue is full.", "headers": RETRY_AFTER},
    503: {"model": Problem, "description": "Not answered in time, or the engine is not serving.",
          "headers": RETRY_AFTER},
}
ADMIN = {
    401: {"model": Problem, "description": "Missing or wrong `X-API-Key`.",
          "headers": {"WWW-Authenticate": {"description": "The scheme: the `X-API-Key` header.",
                                           "schema": {"type": "string"}}}},
    403: {"model": Problem, "description": f"Admin routes are disabled: the server has no `{API_KEY_ENV}`."},
}
PNG_HEADERS = {name: {"description": what, "schema": {"type": kind}} for name, kind, what in [
    ("X-Seed", "integer", "png only: the seed used."),
    ("X-Guidance", "number", "png only: w used."),
    ("X-Steps", "integer", "png only: steps used."),
    ("X-Mode", "string", "png only: cfg or single-eval."),
    ("X-UNet-Evaluations", "integer", "png only: UNet rows evaluated for this image."),
    ("X-Adapters", "string", "png only: adapter names, comma-separated."),
    ("X-Peak-Memory-Bytes", "integer", "png only: peak memory during the request."),
    ("X-Peak-Memory-Kind", "string", "png only: what the peak measures."),
    ("X-Info", "string", "png only: the json format's `info`, as JSON."),
]}


def install_openapi(app: FastAPI) -> None:
    """app.openapi() states the loaded model's limits (the engine's) once it is loaded (cached from then on)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _drop_impossible_422(doc)
            # FastAPI's document model turns bounds into floats, and 2**63 - 1 is not one: the exact integer
            for schema in doc["components"]["schemas"].values():
                if "seed" in schema.get("properties", {}):
                    _branch(schema["properties"]["seed"], "integer")["maximum"] = MAX_SEED
            engine = getattr(app.state, "engine", None)
            if engine is None:  # before the model loads: the static bounds only, and not cached
                return doc
            _state_limits(doc, engine.limits)
            app.openapi_schema = doc
        return app.openapi_schema


    app.openapi = openapi


def _drop_impossible_422(doc: dict) -> None:
    """FastAPI adds a 422 to every route with a parameter; a free-form path name (DELETE /adapters/{name}) can't
    be invalid, and its body shape is not this API's. Routes whose 422 is real declare it themselves."""
    for path in doc["paths"].values():
        for op in path.values():
            ref = op.get("responses", {}).get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if ref.get("$ref", "").endswith("/HTTPValidationError"):
                del op["responses"]["422"]
    schemas = doc.get("components", {}).get("schemas", {})
    if "HTTPValidationError" in schemas and "HTTPValidationError" not in json.dumps(doc["paths"]):
        schemas.pop("HTTPValidationError")
        schemas.pop("ValidationError", None)


def _state_limits(doc: dict, limits: ModelLimits) -> None:
    """The loaded model's bounds on steps and sizes in the request schemas, so that schema-valid data is accepted."""
    schemas = doc["components"]["schemas"]
    for name in ("ImageRequest", "GenerateRequest", "Txt2ImgRequest"):
        if name in schemas:
            _state_size_and_steps(schemas[name]["properties"], limits)
    if "ImagesRequest" in schemas:  # OpenAI's size: exactly the 'WxH' this model takes
        props = schemas["ImagesRequest"]["properties"]
        sides = "|".join(map(str, limits.sides))
        _branch(props["size"], "string")["pattern"] = f"^(auto|({sides})x({sides}))$"
        _branch(props["steps"], "integer")["maximum"] = limits.max_steps


def _branch(prop: dict, kind: str) -> dict:
    """The `kind` branch of an optional field's schema (anyOf [kind, null]), or the schema itself."""
    return next(b for b in prop.get("anyOf", [prop]) if b.get("type") == kind)


def _state_size_and_steps(props: dict, limits: ModelLimits) -> None:
    _branch(props["steps"], "integer")["maximum"] = limits.max_steps
    for field in ("width", "height"):
        branch = _branch(props[field], "integer")
        branch.update(minimum=limits.size_step, maximum=limits.max_size, multipleOf=limits.size_step)
