"""The OpenAI Images API (`POST /v1/images/generations`, `GET /v1/models`), so that the official `openai` client
and everything built on it can generate here. A `model` is a preset: the base alone, the base with one adapter (every
adapter is a model of its name), or an operator's set (`DISTILLERY_PRESETS`); `<lora:name:weight>` in the prompt adds
adapters as in the A1111 API. Fields the server cannot honour are refused, never ignored. Errors come in OpenAI's shape
(`error_shape`)."""

from __future__ import annotations

import time
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, field_validator

from distillery.sampling.plan import ModelLimits
from distillery.serving.config import Settings, adapter_ref
from distillery.serving.engine import Engine
from distillery.serving.errors import Failure, unprocessable
from distillery.serving.jobs import Job
from distillery.serving.openapi import RETRY_AFTER
from distillery.serving.prompt_tags import lora_tags
from distillery.serving.routes.deps import engine_of, settings_of
from distillery.serving.schemas import MAX_GUIDANCE, MAX_IMAGES, MAX_SEED, MAX_STEPS, JSONRequest
from distillery.serving.submit import encoded_b64, info_of, jobs_of, run_jobs

BASE_MODEL = "base"  # the model alone: CFG at the server's default w and steps
SIZE_PATTERN = r"^(auto|[0-9]+x[0-9]+)$"  # the loaded model's exact sizes are stated in the OpenAPI document
CREATED = int(time.time())  # the models' creation time: the server's start

router = APIRouter(prefix="/v1", tags=["OpenAI"])


class ImagesRequest(JSONRequest):
    """openai-python's ImageGenerateParams; `seed`, `steps`, `guidance`, `negative_prompt` are distillery's
    extensions (the client's `extra_body`)."""

    prompt: str = Field(max_length=1000, description="Text prompt; `<lora:name:weight>` tags add adapters.")
    model: str | None = Field(default=None, max_length=200, description=f"A preset (GET /v1/models). Default: "
                                                                        f"{BASE_MODEL!r}, the model alone.")
    n: int | None = Field(default=1, ge=1, le=MAX_IMAGES, description="Images; seeds seed, seed + 1, ...")
    size: str | None = Field(default="auto", max_length=20, pattern=SIZE_PATTERN,
                             description="'WxH' in pixels, each a multiple of the model's size step up to twice its "
                                         "native size (GET /model), or 'auto': the native size.")
    response_format: Literal["b64_json"] | None = Field(
        default=None, description="b64_json only: images come inline ('url' is refused: this server keeps no "
                                  "files to link to).")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(default=None, description="Default png.")
    output_compression: int | None = Field(default=None, ge=0, le=100, description="jpeg / webp quality.")
    quality: Literal["auto", "standard"] | None = Field(
        default=None, description="auto / standard: the preset's own steps ('hd', 'high', ... are refused: set "
                                  "`steps`).")
    background: Literal["auto", "opaque"] | None = Field(default=None, description="Images are opaque ("
                                                                                    "'transparent' is refused).")
    moderation: Literal["auto", "low"] | None = Field(default=None, description="Accepted; no moderation runs here.")
    style: None = Field(default=None, description="Refused when set: no vivid/natural presets here.")
    stream: bool | None = Field(default=None, json_schema_extra={"enum": [False, None]},
                                description="false only: refused when true (the native POST /generate/stream "
                                            "streams progress).")
    partial_images: int | None = Field(default=None, ge=0, le=0, description="0 only: no partial images here.")
    user: str | None = Field(default=None, max_length=200, description="Accepted, for the client's bookkeeping.")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="distillery: the first image's seed. "
                                                                          "Default: random, reported.")
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS, description="distillery: denoising steps.")
    guidance: float | None = Field(default=None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False,
                                   description="distillery: guidance weight w (guidance_scale - 1).")
    negative_prompt: str | None = Field(default=None, max_length=1000, description="distillery: cfg mode only.")

    @field_validator("stream")
    @classmethod
    def _not_streamed(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("true cannot be honoured: images come whole (allowed: false; POST /generate/stream "
                             "streams progress)")
        return value


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, rate_limit_error or server_error.")
    param: str | None = Field(description="The offending field, where one is.")
    code: str | None = Field(description="model_not_found for an unknown model.")


class OpenAIError(BaseModel):
    """Every error of the /v1 routes, as OpenAI answers them."""

    error: OpenAIErrorDetail


ERRORS = {status: {"model": OpenAIError, "description": what, **({"headers": RETRY_AFTER} if status >= 429 else {})}
          for status, what in [
              (400, "Invalid fields (error.param names the field), or a body that is not JSON text."),
              (404, "An unknown model (error.code model_not_found) or adapter."),
              (413, "The body is larger than the server takes."), (429, "The queue is full."),
              (503, "Not answered in time, or the engine is not serving.")]}

class ImageData(BaseModel):
    b64_json: str
    url: None = None
    revised_prompt: None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str
    size: str
    info: list[dict] = Field(description="distillery: each image's seed, steps, mode, latency and memory.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def error_shape(failure: Failure) -> JSONResponse:
    """OpenAI's error body; invalid fields answer 400, as OpenAI answers them."""
    status, fields = failure.status, failure.fields
    kind = "invalid_request_error" if status < 429 else "rate_limit_error" if status == 429 else "server_error"
    error = {"message": failure.message, "type": kind, "param": fields[0]["field"] if fields else None,
             "code": fields[0].get("code") if fields else None}
    return JSONResponse(status_code=400 if status == 422 else status, content={"error": error},
                        headers=failure.headers)


def presets(eng: Engine, settings: Settings) -> dict[str, tuple[tuple[str, float], ...]]:
    """Model id -> its adapters: the base, one per registered adapter, and the operator's presets."""
    found = {BASE_MODEL: (), **{a["name"]: ((a["name"], 1.0),) for a in eng.adapters()["adapters"]}}
    for name, refs in settings.presets.items():
        found[name] = tuple(adapter_ref(ref) for ref in refs)
    return found


@router.get("/models", response_model=ModelList)
async def list_models(eng: Engine = Depends(engine_of), settings: Settings = Depends(settings_of)) -> dict:
    """The presets a request's `model` may name."""
    return {"data": [{"id": name, "created": CREATED, "owned_by": "distillery"} for name in presets(eng, settings)]}


@router.post("/images/generations", response_model=ImagesResponse, responses=ERRORS)
async def generate_images(req: ImagesRequest, request: Request, eng: Engine = Depends(engine_of),
                          settings: Settings = Depends(settings_of)) -> dict:
    """`n` images of one preset, made together; the answer is OpenAI's ImagesResponse."""
    known = presets(eng, settings)
    model = req.model or BASE_MODEL
    if model not in known:
        raise unprocessable("model", f"model: the model {model!r} does not exist (allowed: {sorted(known)})",
                            status=404, code="model_not_found")
    width, height = _size(req.size, eng.limits)
    prompt, tagged = lora_tags(req.prompt)
    job = Job(prompt=prompt, guidance=req.guidance, steps=req.steps, seed=0, adapters=known[model] + tagged,
              height=height, width=width, negative_prompt=req.negative_prompt or "")
    results = await run_jobs(eng, jobs_of(job, req.n or 1, req.seed), request)
    if results is None:  # the client went away: its work was cancelled
        return Response(status_code=499)
    fmt = req.output_format or "png"
    images = await encoded_b64(results, fmt, req.output_compression if fmt != "png" else None)
    return {"created": int(time.time()), "data": [{"b64_json": b64} for b64 in images], "output_format": fmt,
            "size": f"{width}x{height}", "info": [info_of(r) for r in results]}


def _size(size: str | None, limits: ModelLimits) -> tuple[int, int]:
    native = limits.native_size
    if size in (None, "auto"):
        return native, native
    width, height = (int(v) for v in size.split("x"))
    if width not in limits.sides or height not in limits.sides:
        raise unprocessable("size", f"size: {size!r} is not allowed here (allowed: 'auto' or 'WxH', W and H "
                                    f"multiples of {limits.size_step} in [{limits.size_step}, {limits.max_size}], "
                                    f"e.g. '{native}x{native}')")
    return width, height
