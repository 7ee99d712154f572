"""Request and response schemas shared by the HTTP API and the CLI, and readable validation errors."""

from __future__ import annotations

from typing import Any, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from distillery.sampling.plan import MAX_GUIDANCE, MAX_STEPS, RESCALE_RANGE, SCHEDULER_NAMES, WEIGHT_RANGE

MAX_SEED = 2**63 - 1
MAX_IMAGES = 10  # per request: the OpenAI API's bound; they are submitted together (distillery/serving/submit.py)
# A folder under the adapters root: relative, segments separated by "/", none of them empty, "." or ".."
# (a segment may not start with "."), no control characters. What the server can check without a disk.
ADAPTER_PATH_PATTERN = r"^[^/.\x00-\x1f\x7f][^/\x00-\x1f\x7f]*(/[^/.\x00-\x1f\x7f][^/\x00-\x1f\x7f]*)*$"
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
PATTERN_HELP = {
    ADAPTER_PATH_PATTERN: "a relative folder path under the adapters root: '/'-separated names, none empty or "
                          "starting with '.', no control characters",
    ADAPTER_NAME_PATTERN: "letters, digits, '.', '_' and '-', starting with a letter or digit",
}


RESCALE_DESCRIPTION = ("CFG's std rescale (Lin et al. 2023, arXiv 2305.08891; diffusers' guidance_rescale): 0 is "
                       "plain CFG, 0.7 suits zero-terminal-SNR models; cfg mode only.")


class JSONRequest(BaseModel):
    """A request body read strictly ("25" is no number of steps, a misspelt field is an error, not ignored), whose
    integer fields take 4.0: JSON cannot tell it from 4 (JSON Schema's integer includes it); true and 2.5 stay
    refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {k: int(v) if isinstance(v, float) and v.is_integer() and k in cls.model_fields
                and int in _types(cls.model_fields[k].annotation) else v for k, v in data.items()}


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200, pattern=ADAPTER_NAME_PATTERN, description="Name to serve it under.")
    path: str = Field(min_length=1, max_length=1000, pattern=ADAPTER_PATH_PATTERN,
                      description="Adapter folder or LoRA .safetensors file, relative to the adapters root "
                                  "(`DISTILLERY_ADAPTERS_ROOT`).")


class AdapterRef(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200, description="A loaded adapter's name (GET /adapters).")
    weight: float = Field(default=1.0, ge=WEIGHT_RANGE[0], le=WEIGHT_RANGE[1], allow_inf_nan=False,
                          description="LoRA scale.")


class ImageRequest(JSONRequest):
    """What POST /generate/stream takes (progress events, then the json answer); POST /generate adds the format."""

    prompt: str = Field(max_length=1000, description="Text prompt (valid Unicode: no lone surrogates); empty gives an "
                                                     "unconditional image.")
    negative_prompt: str | None = Field(default=None, max_length=1000,
                                        description="CFG mode only: replaces the empty prompt of the unconditional branch.")
    guidance: float | None = Field(
        default=None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False,
        description="Guidance weight w (Meng et al.): eps = (1 + w) eps(c) - w eps(empty); w = 0 is the plain "
                    "conditional model; diffusers' guidance_scale = 1 + w. Default: the model's measured best w.",
    )
    guidance_rescale: float | None = Field(default=None, ge=RESCALE_RANGE[0], le=RESCALE_RANGE[1], allow_inf_nan=False,
                                           description=RESCALE_DESCRIPTION + " Default: the model's (GET /model).")
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS,
                              description="Denoising steps, at most what the model's scheduler and the operator's "
                                          "`DISTILLERY_MAX_STEPS` allow (GET /model: max_steps), and one a "
                                          "step-distilled adapter supports (GET /adapters: steps). Default: the "
                                          "step-distilled adapter's recommended_steps, else the model's, "
                                          "capped likewise.")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED,
                             description="Seed of the initial noise; image i of n gets seed + i. Omitted: a random "
                                         "one in [0, 2^32), reported in the answer.")
    n: int = Field(default=1, ge=1, le=MAX_IMAGES, description="Images, made together (one batch); more than one "
                                                               "needs response_format json.")
    scheduler: Literal[SCHEDULER_NAMES] | None = Field(
        default=None, description="Diffusers scheduler. Default: the distilled adapter's own (GET /adapters: "
                                  "recommended_scheduler), else ddim; a step-distilled adapter allows only its own.")
    width: int | None = Field(default=None, ge=8, le=4096,
                              description="Pixels; a multiple of the model's size step (GET /model), at most twice its "
                                          "native size. Default: the native size.")
    height: int | None = Field(default=None, ge=8, le=4096, description="As width.")
    adapters: list[AdapterRef] = Field(
        default_factory=list, max_length=8,
        description="Adapters to apply. With a guidance-distilled adapter in the set, sampling makes ONE UNet "
                    "evaluation per step at w (single-eval mode), and w must lie in its trained range; "
                    "otherwise classifier-free guidance makes two (cfg mode).",
    )



class GenerateRequest(ImageRequest):
    model_config = ConfigDict(json_schema_extra={  # a PNG body holds one image
        "if": {"properties": {"response_format": {"const": "json"}}, "required": ["response_format"]},
        "else": {"properties": {"n": {"maximum": 1}}}})

    response_format: Literal["png", "json"] = Field(
        default="png", description="png: raw bytes, info in X-* headers (n = 1 only); json: base64 PNGs and info.")


# ---- responses (documented in the OpenAPI document; the error bodies are what every error answers)


class FieldError(BaseModel):
    field: str = Field(description="The offending field, dotted for nested ones (adapters.0.weight); 'body' for "
                                   "the whole body.")
    message: str = Field(description="What is wrong and what is allowed.")
    input: Any = Field(default=None, description="The value received, where there was one.")


class InvalidFields(BaseModel):
    """422: every invalid field, named, with the allowed range."""

    detail: list[FieldError]


class Problem(BaseModel):
    """Any other error: what went wrong, in words."""

    detail: str


class PeakMemory(BaseModel):
    kind: str = Field(description="cuda_allocator on a GPU, process_rss on CPU.")
    peak_bytes: float


class GenerateInfo(BaseModel):
    seed: int
    guidance: float
    guidance_rescale: float = Field(description=RESCALE_DESCRIPTION)
    steps: int
    scheduler: str
    mode: Literal["cfg", "single-eval"]
    unet_evaluations: int
    adapters: list[tuple[str, float]] = Field(description="[name, weight] pairs.")
    latency_ms: dict[str, float] = Field(description="queue, text_encode, denoise, decode, total.")
    peak_memory: PeakMemory


class ImageJSON(BaseModel):
    image_png_base64: str
    info: GenerateInfo


class GenerateJSON(ImageJSON):
    """The first image at the top level (as before `n` existed), and every image in `images`."""

    images: list[ImageJSON]


class AdapterInfo(BaseModel):
    name: str
    resident: bool
    in_use: int
    kind: str | None = Field(default=None, description="Resident adapters only, as the fields below.")
    rank: int | None = None
    bytes: int | None = None
    recommended_steps: int | None = None
    recommended_scheduler: str | None = Field(default=None, description="What a request without `scheduler` gets.")
    schedulers: list[str] | None = Field(default=None, description="Step-distilled adapters: the only schedulers "
                                                                   "they sample with.")
    steps: list[int] | None = Field(default=None, description="Step-distilled adapters: the step counts they support.")
    w_range: tuple[float, float] | None = Field(default=None, description="Distilled (w-conditioned) adapters only.")


class AdapterList(BaseModel):
    budget_bytes: int | None = Field(default=None, description="Resident bytes allowed; absent: no budget.")
    resident_bytes: int
    adapters: list[AdapterInfo]


class AdapterLoaded(BaseModel):
    name: str
    kind: str
    bytes: int


class Unloaded(BaseModel):
    unloaded: str


class LoRABackends(BaseModel):
    """Which LoRA backend runs a UNet call, chosen at start-up by timing each (DISTILLERY_ADAPTER_BACKEND=auto)."""

    one_set: str = Field(description="The backend of calls whose rows all use one adapter set.")
    mixed: str = Field(description="The backend of calls mixing adapter sets (rows without adapters count as one).")
    timings_ms: dict[str, dict[str, float]] = Field(
        description="Case -> backend -> median ms of one UNet call of the configured batch; empty when forced.")
    forced: str | None = Field(description="The backend DISTILLERY_ADAPTER_BACKEND forces, if not auto.")
    refused: dict[str, str] = Field(description="Backends whose eps did not match the reference's, and why.")


class ModelInfo(BaseModel):
    path: str
    family: Literal["sd", "sdxl"] = Field(description="sd: SD 1.x / 2.x (one text encoder); sdxl: SDXL and its "
                                                      "pruned shapes (two text encoders, pooled embeds, size ids).")
    fingerprint: str
    native_size: int
    size_step: int
    max_size: int = Field(description="Largest width or height: twice the native size.")
    max_steps: int = Field(description="Most steps a request may ask for here.")
    default_guidance: float
    default_guidance_rescale: float = Field(description="A CFG request's guidance_rescale when it names none.")
    default_steps: int
    schedulers: list[str] = Field(description="The schedulers a request may name.")
    lora_backends: LoRABackends


class PlanInfo(BaseModel):
    """What a request would be sampled with (POST /generate/plan)."""

    guidance: float
    guidance_rescale: float = Field(description=RESCALE_DESCRIPTION)
    steps: int
    scheduler: str
    mode: Literal["cfg", "single-eval"]
    width: int
    height: int
    unet_evaluations: int = Field(description="UNet rows per image: steps x (2 in cfg mode, 1 single-eval).")


class Health(BaseModel):
    status: Literal["alive", "dead"]


class Readiness(BaseModel):
    ready: bool


def allowed_range(model: type[BaseModel], field: str) -> str | None:
    """'integer in [1, 1000]'-style text from a field's constraints, or None if it has none."""
    info = model.model_fields.get(field)
    if info is None:
        return None
    lo = hi = None
    for m in info.metadata:
        if isinstance(m, (Ge, Gt)):
            lo = f"[{m.ge}" if isinstance(m, Ge) else f"({m.gt}"
        if isinstance(m, (Le, Lt)):
            hi = f"{m.le}]" if isinstance(m, Le) else f"{m.lt})"
    if any(getattr(t, "__origin__", None) in (dict, list) for t in _types(info.annotation)):
        return None  # a container: its item types are not its own
    kind = {int: "integer", float: "finite number", str: "string"}
    base = next((kind[t] for t in kind if t in _types(info.annotation)), None)
    if lo or hi:
        return f"{base or 'value'} in {lo or '(-inf'}, {hi or 'inf)'}"
    return base


def _types(annotation: Any) -> tuple:
    return getattr(annotation, "__args__", (annotation,))


def _field_owner(model: type[BaseModel], loc: list[str]) -> tuple[type[BaseModel], str]:
    """The model and field a (possibly nested) error location points at: adapters.0.weight -> AdapterRef.weight."""
    for i, part in enumerate(loc):
        info = model.model_fields.get(part)
        if info is None or i == len(loc) - 1:
            return model, part
        inner = next((t for t in _types(getattr(info.annotation, "__args__", (None,))[0]) if isinstance(t, type)
                      and issubclass(t, BaseModel)), None)
        if inner is None:
            return model, part
        model = inner
    return model, loc[-1] if loc else ""


def describe_errors(model: type[BaseModel] | None, errors: list[dict]) -> list[dict[str, Any]]:
    """Each error (pydantic's `exc.errors()`) with the field's name, the offending value and the allowed range."""
    out = []
    for err in errors:
        loc = [x for x in err["loc"] if x != "body"]
        names = [_text(str(x)) for x in loc]
        owner, field = _field_owner(model, [str(x) for x in loc if not isinstance(x, int)]) if model else (None, "")
        field = _text(field) or (names[-1] if names else "body")
        allowed = allowed_range(owner, field) if owner else None
        if err["type"] == "extra_forbidden" and owner:
            allowed = f"one of the known fields: {', '.join(owner.model_fields)}"
        if err["type"] == "string_unicode":  # valid JSON ("\udcff") that no tokenizer or file system can take
            allowed = "valid Unicode text: a lone surrogate (\\ud800-\\udfff) cannot be encoded as UTF-8"
        why = owner.model_fields[field].description or "" if owner and owner.model_fields.get(field) else ""
        if err["type"] in ("literal_error", "none_required") and "refused" in why.lower():
            allowed = why  # says why the other values are refused
        if err["type"] == "string_pattern_mismatch":
            allowed = PATTERN_HELP.get((err.get("ctx") or {}).get("pattern"), allowed)
        text = _text(err["msg"]).removeprefix("Value error, ")  # our validators' messages say what is allowed
        message = f"{field}: {text}" + (f" (allowed: {allowed})" if allowed and "allowed:" not in text else "")
        out.append({"field": ".".join(names) or "body", "message": message, "input": _jsonable(err.get("input"))})
    return out


def _text(value: str) -> str:
    """`value` with anything UTF-8 cannot carry (lone surrogates) written as escapes: safe in any JSON answer."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


ECHO_CHARS = 80  # the most of a client's input an error repeats back: enough to recognise it, never the whole body


def _jsonable(value: Any) -> Any:
    """The offending input, as an error may echo it: JSON-safe, and at most a short prefix of it."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    if isinstance(value, (int, float, bool, type(None))):
        return value
    text = _text(value if isinstance(value, str) else repr(value)[:4 * ECHO_CHARS])
    return text if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}... ({len(text)} characters)"
