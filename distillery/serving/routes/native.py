"""The native API: POST /generate (PNG or JSON), POST /generate/stream (progress events), POST /generate/plan
(what a request would sample with, nothing generated) and GET /model (the loaded model's limits)."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.requests import Request

from distillery.serving.config import Settings
from distillery.serving.engine import Engine
from distillery.serving.errors import unprocessable
from distillery.serving.jobs import Job, Result
from distillery.serving.openapi import FAILURES, PNG_HEADERS
from distillery.serving.routes.deps import engine_of, settings_of
from distillery.serving.schemas import GenerateJSON, GenerateRequest, ImageRequest, ModelInfo, PlanInfo
from distillery.serving.submit import encoded_b64, info_of, jobs_of, run_jobs, streamed

router = APIRouter(tags=["native"])

SSE_EVENT = {"type": "object", "required": ["event", "data"], "properties": {
    "event": {"type": "string", "enum": ["progress", "result", "error"]},
    "data": {"type": "string", "description": "JSON text: {index, step, steps}; the json answer; {status, detail}."}}}


def job_of(req: ImageRequest) -> Job:
    """The request's image as the engine's Job (unset fields: the plan's defaults)."""
    return Job(prompt=req.prompt, guidance=req.guidance, steps=req.steps, seed=0, scheduler=req.scheduler,
               adapters=tuple((a.name, a.weight) for a in req.adapters), height=req.height, width=req.width,
               negative_prompt=req.negative_prompt or "", guidance_rescale=req.guidance_rescale)


async def generated_json(results: list[Result]) -> dict:
    """POST /generate's json answer: every image with its info, the first one also at the top level."""
    images = [{"image_png_base64": b64, "info": info_of(r)} for r, b64 in zip(results, await encoded_b64(results))]
    return {**images[0], "images": images}


@router.post("/generate", response_class=Response, responses={
    200: {"model": GenerateJSON, "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
          "description": "The image: PNG bytes (`response_format: png`) or base64 PNGs and info (`json`).",
          "headers": PNG_HEADERS},
    **FAILURES,
})
async def generate_image(req: GenerateRequest, request: Request, eng: Engine = Depends(engine_of)) -> Response:
    """`n` images (one batch). Mode: a guidance-distilled adapter in `adapters` -> single-eval (1 UNet row per
    step), otherwise cfg (2). Latency breakdown and peak memory come with every answer."""
    if req.n > 1 and req.response_format == "png":
        raise unprocessable("n", f"n: {req.n} images need response_format 'json' (allowed with png: 1)")
    results = await run_jobs(eng, jobs_of(job_of(req), req.n, req.seed), request)
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


@router.post("/generate/stream", response_class=EventSourceResponse, responses={
    200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
          "description": "Server-sent events: `progress` {index, step, steps} after each step of image `index`, "
                         "then `result` (POST /generate's json answer), or `error` {status, detail} if it fails "
                         "after the stream began."},
    **FAILURES,
})
async def generate_stream(req: ImageRequest, eng: Engine = Depends(engine_of),
                          settings: Settings = Depends(settings_of)) -> EventSourceResponse:
    """As POST /generate, with live progress: what the playground at / shows."""
    return await streamed(eng, jobs_of(job_of(req), req.n, req.seed), generated_json, settings.graceful_shutdown_s)


@router.post("/generate/plan", response_model=PlanInfo,
             responses={status: FAILURES[status] for status in (400, 404, 413, 422)})  # nothing queued: no 429 or 503
async def plan_request(req: ImageRequest, eng: Engine = Depends(engine_of)) -> dict:
    """What POST /generate would sample this request with (mode, scheduler, steps, w, size), or its refusal;
    nothing is generated or queued. The playground shows its defaults from here."""
    job, _, plan = await eng.planned(job_of(req))
    return {"guidance": plan.guidance, "guidance_rescale": plan.guidance_rescale, "steps": plan.steps,
            "scheduler": plan.scheduler, "mode": plan.mode,
            "width": plan.width, "height": plan.height, "unet_evaluations": plan.rows_per_step * plan.steps}


@router.get("/model", response_model=ModelInfo)
async def model_info(eng: Engine = Depends(engine_of), settings: Settings = Depends(settings_of)) -> dict:
    limits = eng.limits
    return {"path": settings.model_path, "family": limits.family, "fingerprint": eng.fingerprint, "native_size": limits.native_size,
            "size_step": limits.size_step, "max_size": limits.max_size, "max_steps": limits.max_steps,
            "default_guidance": limits.default_guidance, "default_guidance_rescale": limits.default_guidance_rescale,
            "default_steps": limits.default_steps,
            "schedulers": list(limits.schedulers), "lora_backends": eng.lora_backends()}
