"""The AUTOMATIC1111 web UI API (`POST /sdapi/v1/txt2img`, `GET /sdapi/v1/samplers | sd-models | loras`), so that
`webuiapi` and the scripts written for A1111 generate here. Every txt2img field A1111 knows is accepted: what applies
is honoured (cfg_scale -> w = cfg_scale - 1, seed -1 = random, batch_size x n_iter images, `<lora:name:weight>` in
the prompt, DDIM's eta); a field that would change the image and cannot be honoured (`enable_hr: true`, ...) is a 422
naming it, never a silent ignore. Errors come in A1111's shape (`error_shape`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from distillery.sampling.plan import SCHEDULER_NAMES
from distillery.serving.config import Settings
from distillery.serving.engine import Engine
from distillery.serving.errors import Failure, unprocessable
from distillery.serving.jobs import Job
from distillery.serving.openapi import RETRY_AFTER
from distillery.serving.prompt_tags import lora_tags
from distillery.serving.routes.deps import engine_of, settings_of
from distillery.serving.schemas import MAX_GUIDANCE, MAX_IMAGES, MAX_SEED, MAX_STEPS, FieldError, JSONRequest
from distillery.serving.submit import encoded_b64, info_of, jobs_of, run_jobs

# A1111 sampler name -> (distillery scheduler, A1111's aliases): every scheduler the plan knows, by A1111's name
SAMPLERS = {"Euler a": ("euler_a", ["k_euler_a", "k_euler_ancestral"]), "Euler": ("euler", ["k_euler"]),
            "DDIM": ("ddim", []), "DPM++ 2M": ("dpm", ["k_dpmpp_2m"]), "LCM": ("lcm", ["k_lcm"])}
assert sorted(s for s, _ in SAMPLERS.values()) == sorted(SCHEDULER_NAMES), "a scheduler without an A1111 name"
# The engine's field names as A1111 calls them (cfg_scale = 1 + w)
FIELDS = {"guidance": "cfg_scale", "scheduler": "sampler_name", "n": "batch_size"}
HTTP_REASONS = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed", 409: "Conflict", 413: "PayloadTooLarge",
                422: "RequestValidationError", 429: "TooManyRequests", 503: "ServiceUnavailable"}
EULER_A = ["Euler a", *SAMPLERS["Euler a"][1]]
ETA_ONE = {"properties": {"eta": {"enum": [1, None]}}}
SAMPLER_NAMES = tuple(n for name, (_, aliases) in SAMPLERS.items() for n in (name, *aliases))
# Fields that change the image and have no counterpart here: the values allowed, and why the others are refused.
REFUSED = {
    "enable_hr": ((False, None), "no hires-fix second pass here"),
    "restore_faces": ((False, None), "no face restoration model here"),
    "tiling": ((False, None), "no tiling convolutions here"),
    "styles": (([], None), "no saved prompt styles here: put the text in the prompt"),
    "subseed_strength": ((0, None), "no variation seeds here"),
    "s_min_uncond": ((0, None), "the unconditional branch is never skipped here"),
    "s_churn": ((0, None), "no stochastic churn here"),
    "s_noise": ((1, None), "ancestral noise is not scaled here"),
    "refiner_checkpoint": ((None, "", "None"), "no refiner model here"),
    "firstpass_image": ((None, ""), "txt2img here starts from noise"),
    "infotext": ((None, ""), "send the parameters as fields"),
    "script_name": ((None, ""), "no scripts here"),
    "script_args": (([], None), "no scripts here"),
    "save_images": ((False, None), "this server keeps no images"),
    "scheduler": ((None, "automatic", "Automatic"), "the sampler's own noise schedule only"),
}
MAX_WEIGHTLESS_TEXT = 2000  # A1111 prompts carry tags and weights: longer than the native API's

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])


def _refusable(name: str, default: Any = None):
    allowed, why = REFUSED[name]
    return Field(default=default, description=f"Accepted: {[v for v in allowed]}; other values are refused ({why}).",
                 json_schema_extra={"enum": list(allowed)})


class OverrideSettings(JSONRequest):
    sd_model_checkpoint: str | None = Field(default=None, max_length=1000,
                                            description="The loaded model's title or name (GET /sdapi/v1/sd-models).")


class Txt2ImgRequest(JSONRequest):
    """A1111's StableDiffusionTxt2ImgProcessingAPI (modules/api/models.py), every field."""

    model_config = ConfigDict(json_schema_extra={"allOf": [  # Euler a: eta 1 only
        {"if": {"properties": {"sampler_name": {"enum": EULER_A}}, "required": ["sampler_name"]}, "then": ETA_ONE},
        {"if": {"properties": {"sampler_name": {"type": "null"}, "sampler_index": {"enum": EULER_A}},
                "required": ["sampler_index"]}, "then": ETA_ONE}]})

    prompt: str = Field(default="", max_length=MAX_WEIGHTLESS_TEXT, description="`<lora:name:weight>` adds adapters.")
    negative_prompt: str = Field(default="", max_length=MAX_WEIGHTLESS_TEXT, description="cfg mode only.")
    seed: int = Field(default=-1, ge=-1, le=MAX_SEED, description="-1: random (reported in info).")
    sampler_name: Literal[SAMPLER_NAMES] | None = Field(
        default=None, description="Default: the distilled adapter's own scheduler, else DDIM.")
    sampler_index: Literal[SAMPLER_NAMES] | None = Field(default=None, description="Deprecated: sampler_name.")
    batch_size: int = Field(default=1, ge=1, le=MAX_IMAGES, description="Images made together.")
    n_iter: int = Field(default=1, ge=1, le=MAX_IMAGES, description="Batches, one after the other.")
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS, description="Default: the server's.")
    cfg_scale: float | None = Field(default=None, ge=1.0, le=1.0 + MAX_GUIDANCE, allow_inf_nan=False,
                                    description="guidance_scale = 1 + w. Default: the server's w.")
    width: int | None = Field(default=None, ge=8, le=4096, description="Default: the model's native size.")
    height: int | None = Field(default=None, ge=8, le=4096, description="Default: the model's native size.")
    eta: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False,
                              description="DDIM: its eta (default 0). Euler a: 1 only (its full ancestral noise). "
                                          "Ignored by the other samplers, as in A1111.")
    send_images: bool = Field(default=True, description="false: no images in the answer, info only.")
    disable_extra_networks: bool = Field(default=False, description="true: `<lora:...>` tags are removed, unused.")
    # accepted and honoured by doing nothing: this server saves nothing, and these only act with hires fix,
    # churn or variation seeds, which are refused above
    subseed: int = -1
    seed_resize_from_h: int = Field(default=-1, le=0, description="Seeds are not resized here: -1 or 0 only.")
    seed_resize_from_w: int = Field(default=-1, le=0, description="As seed_resize_from_h.")
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    s_tmax: float | None = None
    s_tmin: float | None = None
    denoising_strength: float | None = None
    override_settings: OverrideSettings | None = Field(
        default=None, description="{} or sd_model_checkpoint only (switching models is a restart here).")
    override_settings_restore_afterwards: bool = True
    refiner_switch_at: float | None = None
    comments: dict[str, Any] | None = None
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_additional_modules: list[str] | None = None
    force_task_id: str | None = None
    alwayson_scripts: dict[str, Any] = Field(
        default_factory=dict, description="{} or scripts switched off ({\"args\": []} or args[0] false) only.",
        json_schema_extra={"additionalProperties": {"type": "object", "properties": {"args": {"anyOf": [
            {"type": "array", "maxItems": 0}, {"type": "array", "minItems": 1, "prefixItems": [{"const": False}]}]}}}})
    enable_hr: bool | None = _refusable("enable_hr", False)
    restore_faces: bool | None = _refusable("restore_faces")
    tiling: bool | None = _refusable("tiling")
    styles: list[str] | None = _refusable("styles")
    subseed_strength: float | None = _refusable("subseed_strength", 0.0)
    s_min_uncond: float | None = _refusable("s_min_uncond", 0.0)
    s_churn: float | None = _refusable("s_churn", 0.0)
    s_noise: float | None = _refusable("s_noise", 1.0)
    refiner_checkpoint: str | None = _refusable("refiner_checkpoint")
    firstpass_image: str | None = _refusable("firstpass_image")
    infotext: str | None = _refusable("infotext")
    script_name: str | None = _refusable("script_name")
    script_args: list[Any] | None = _refusable("script_args")
    save_images: bool | None = _refusable("save_images", False)
    scheduler: str | None = _refusable("scheduler")

    @field_validator(*REFUSED)
    @classmethod
    def _honourable(cls, value: Any, info: ValidationInfo) -> Any:
        allowed, why = REFUSED[info.field_name]
        if not any(value is a if a is None or isinstance(a, bool) else value == a and not isinstance(value, bool)
                   for a in allowed):
            raise ValueError(f"{value!r} cannot be honoured: {why} (allowed: {list(allowed)})")
        return value

    @field_validator("alwayson_scripts")
    @classmethod
    def _scripts_off(cls, value: dict) -> dict:
        on = [name for name, script in value.items() if _script_on(script)]
        if on:
            raise ValueError(f"scripts {on} cannot be honoured: no scripts here (allowed: {{}} or scripts with "
                             f"args [] or args[0] false)")
        return value


def _script_on(script: Any) -> bool:
    """A script's entry turns it on unless its args are [] or start with false (how webuiapi sends one off)."""
    args = script.get("args", []) if isinstance(script, dict) else True
    return not (isinstance(args, list) and (not args or args[0] is False))


def model_hash(eng: Engine) -> str:
    """A1111's short hash of the loaded model: the first 10 hex digits of its fingerprint."""
    return eng.fingerprint[:10]


def model_title(eng: Engine, settings: Settings) -> tuple[str, str]:
    """(A1111's title "name [hash]", name) of the loaded model."""
    name = Path(settings.model_path).name
    return f"{name} [{model_hash(eng)}]", name


def error_shape(failure: Failure) -> JSONResponse:
    """A1111's error body {error, detail, body, errors}, fields named as A1111 names them."""
    detail = [{**f, "field": FIELDS.get(f["field"], f["field"])} for f in failure.fields] or failure.detail
    error = {"error": HTTP_REASONS.get(failure.status, "Error"), "detail": detail, "body": "",
             "errors": failure.message}
    return JSONResponse(status_code=failure.status, content=error, headers=failure.headers)


class A1111Error(BaseModel):
    """Every error of the /sdapi routes, as A1111's API answers them."""

    error: str = Field(description="What kind: RequestValidationError, NotFound, TooManyRequests, ...")
    detail: str | list[FieldError] = Field(description="The message, or each invalid field with what is allowed.")
    body: str
    errors: str = Field(description="The message(s) as one text.")


ERRORS = {status: {"model": A1111Error, "description": what, **({"headers": RETRY_AFTER} if status >= 429 else {})}
          for status, what in [
              (400, "A body that is not JSON text."), (404, "An unknown LoRA in the prompt, or checkpoint."),
              (422, "Invalid or unhonourable fields, each named with the values allowed."),
              (413, "The body is larger than the server takes."), (429, "The queue is full."),
              (503, "Not answered in time, or the engine is not serving.")]}


class Txt2ImgResponse(BaseModel):
    images: list[str] = Field(description="Base64 PNGs.")
    parameters: dict[str, Any] = Field(description="The request, with its defaults.")
    info: str = Field(description="JSON text: seed, all_seeds, sampler_name, cfg_scale, infotexts, ..., and "
                                  "distillery: each image's info (latency, memory).")


@router.post("/txt2img", response_model=Txt2ImgResponse, responses=ERRORS)
async def txt2img(req: Txt2ImgRequest, request: Request, eng: Engine = Depends(engine_of),
                  settings: Settings = Depends(settings_of)) -> dict:
    """batch_size x n_iter images, queued together (A1111 makes its batches one after the other; here they share
    UNet calls, with the same seeds and images); answers A1111's {images, parameters, info}."""
    titles = model_title(eng, settings)
    checkpoint = req.override_settings and req.override_settings.sd_model_checkpoint
    if checkpoint not in (None, *titles):
        raise unprocessable("override_settings.sd_model_checkpoint", f"override_settings.sd_model_checkpoint: no "
                            f"checkpoint {checkpoint!r} here (allowed: {list(titles)})", status=404)
    sampler = req.sampler_name or req.sampler_index
    scheduler = next((s for name, (s, aliases) in SAMPLERS.items() if sampler in (name, *aliases)), None)
    if scheduler == "euler_a" and req.eta not in (None, 1.0):
        raise unprocessable("eta", f"eta: {req.eta} cannot be honoured with Euler a: its noise is not scaled here "
                                   f"(allowed: 1 or null)")
    prompt, tagged = lora_tags(req.prompt)
    job = Job(prompt=prompt, guidance=None if req.cfg_scale is None else req.cfg_scale - 1.0, steps=req.steps, seed=0,
              scheduler=scheduler, adapters=() if req.disable_extra_networks else tagged, height=req.height,
              width=req.width, negative_prompt=req.negative_prompt,
              eta=(req.eta or 0.0) if scheduler == "ddim" else 0.0)
    jobs = jobs_of(job, req.batch_size * req.n_iter, None if req.seed == -1 else req.seed)
    results = await run_jobs(eng, jobs, request)
    if results is None:  # the client went away: its work was cancelled
        return Response(status_code=499)
    images = await encoded_b64(results) if req.send_images else []
    parameters = {k: _echoable(v) for k, v in req.model_dump().items()}
    return {"images": images, "parameters": parameters, "info": json.dumps(_info(req, results, eng, settings))}


ECHO_DEPTH = 32  # a free-form field (comments, script args) nested deeper is not echoed back


def _echoable(value: Any) -> Any:
    """`value` if it can be echoed in the answer as JSON (valid UTF-8, nested at most ECHO_DEPTH), else None:
    what A1111 echoes is the client's own, and must never fail the answer after the images are made."""
    def depth(v: Any, level: int = 0) -> int:
        if level > ECHO_DEPTH or not isinstance(v, (dict, list)):
            return level
        return max((depth(x, level + 1) for x in (v.values() if isinstance(v, dict) else v)), default=level)

    try:
        if depth(value) > ECHO_DEPTH:
            return None
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, TypeError, UnicodeEncodeError, RecursionError):
        return None
    return value


def _info(req: Txt2ImgRequest, results: list, eng: Engine, settings: Settings) -> dict:
    """A1111's info (a JSON string in the answer), with each image's distillery info."""
    first = results[0].job
    seeds = [r.job.seed for r in results]
    sampler = next(name for name, (s, _) in SAMPLERS.items() if s == first.scheduler)
    _, name = model_title(eng, settings)
    short_hash = model_hash(eng)
    infotexts = [f"{first.prompt}\nNegative prompt: {first.negative_prompt}\nSteps: {r.job.steps}, Sampler: {sampler}, "
                 f"CFG scale: {r.job.guidance + 1.0}, Seed: {r.job.seed}, Size: {r.image.width}x{r.image.height}, "
                 f"Model hash: {short_hash}, Model: {name}" for r in results]
    return {"prompt": req.prompt, "all_prompts": [req.prompt] * len(results), "negative_prompt": req.negative_prompt,
            "all_negative_prompts": [req.negative_prompt] * len(results), "seed": seeds[0], "all_seeds": seeds,
            "subseed": -1, "all_subseeds": [-1] * len(results), "subseed_strength": 0, "width": results[0].image.width,
            "height": results[0].image.height, "sampler_name": sampler, "cfg_scale": first.guidance + 1.0,
            "steps": first.steps, "batch_size": req.batch_size, "restore_faces": False, "sd_model_name": name,
            "sd_model_hash": short_hash, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "clip_skip": 1, "index_of_first_image": 0, "infotexts": infotexts,
            "extra_generation_params": {"Lora": ", ".join(f"{n}: {w}" for n, w in first.adapters)} if first.adapters
            else {}, "distillery": [info_of(r) for r in results]}


@router.get("/samplers")
async def samplers() -> list[dict]:
    return [{"name": name, "aliases": aliases, "options": {"scheduler": s}} for name, (s, aliases) in SAMPLERS.items()]


@router.get("/schedulers")
async def schedulers() -> list[dict]:
    """Only the samplers' own noise schedules (txt2img's `scheduler`: automatic)."""
    return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False}]


@router.get("/sd-models")
async def sd_models(eng: Engine = Depends(engine_of), settings: Settings = Depends(settings_of)) -> list[dict]:
    """The one loaded model (switching checkpoints is a restart with DISTILLERY_MODEL_PATH)."""
    title, name = model_title(eng, settings)
    return [{"title": title, "model_name": name, "hash": model_hash(eng), "sha256": eng.fingerprint,
             "filename": settings.model_path, "config": None}]


@router.get("/loras")
async def loras(eng: Engine = Depends(engine_of)) -> list[dict]:
    """Every adapter, by the name `<lora:name:weight>` takes."""
    return [{"name": a["name"], "alias": a["name"], "path": a["path"],
             "metadata": {"kind": a["kind"], "rank": a["rank"]} if a["resident"] else {}}
            for a in eng.adapters()["adapters"]]
