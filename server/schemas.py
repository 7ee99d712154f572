"""Request schemas shared by the HTTP API and the CLI, and readable validation errors."""

from __future__ import annotations

from typing import Any, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ConfigDict, Field

MAX_STEPS = 1000
MAX_GUIDANCE = 30.0
MAX_SEED = 2**63 - 1


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="Name to serve it under.")
    path: str = Field(min_length=1, max_length=1000, description="Adapter folder, relative to the adapters root.")


class AdapterRef(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200, description="A loaded adapter's name (GET /adapters).")
    weight: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="LoRA scale.")


class GenerateRequest(BaseModel):
    # strict: "25" is not a number of steps; forbid: a misspelt field is an error, not ignored.
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(max_length=1000, description="Text prompt; empty gives an unconditional image.")
    negative_prompt: str | None = Field(default=None, max_length=1000,
                                        description="CFG mode only: replaces the empty prompt of the unconditional branch.")
    guidance: float | None = Field(
        default=None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False,
        description="Guidance weight w (Meng et al.): eps = (1 + w) eps(c) - w eps(empty); w = 0 is the plain "
                    "conditional model; diffusers' guidance_scale = 1 + w. Default: the model's measured best w.",
    )
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS, description="Denoising steps. Default: the model's.")
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seed of the initial noise.")
    scheduler: Literal["ddim", "euler", "dpm"] = Field(default="ddim", description="Diffusers scheduler.")
    width: int | None = Field(default=None, ge=8, le=4096,
                              description="Pixels; a multiple of the model's size step (GET /model), at most twice its "
                                          "native size. Default: the native size.")
    height: int | None = Field(default=None, ge=8, le=4096, description="As width.")
    response_format: Literal["png", "json"] = Field(
        default="png", description="png: raw bytes, info in X-* headers; json: base64 PNG and info.")
    adapters: list[AdapterRef] = Field(
        default_factory=list, max_length=8,
        description="Adapters to apply. With a guidance-distilled adapter in the set, sampling makes ONE UNet "
                    "evaluation per step at w (single-eval mode), and w must lie in its trained range; "
                    "otherwise classifier-free guidance makes two (cfg mode).",
    )


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


def describe_errors(model: type[BaseModel], errors: list[dict]) -> list[dict[str, Any]]:
    """Each error (pydantic's `exc.errors()`) with the field's name, the offending value and the allowed range."""
    out = []
    for err in errors:
        loc = [str(x) for x in err["loc"] if x != "body"]
        owner, field = _field_owner(model, [x for x in loc if not x.isdigit()])
        allowed = allowed_range(owner, field)
        if err["type"] == "extra_forbidden":
            allowed = f"one of the known fields: {', '.join(owner.model_fields)}"
        message = f"{field}: {err['msg']}" + (f" (allowed: {allowed})" if allowed else "")
        out.append({"field": ".".join(loc) or "body", "message": message, "input": _jsonable(err.get("input"))})
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and value != value or value in (float("inf"), float("-inf")):
        return str(value)
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
