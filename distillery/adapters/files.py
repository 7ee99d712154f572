"""The adapter folder format, shared by the distillers (writing) and the server (reading).

    <adapter>/pytorch_lora_weights.safetensors   LoRA, diffusers/peft format ("unet." keys):
                                                 stock diffusers `load_lora_weights` loads it
    <adapter>/guidance_projection.safetensors    the w projection ("weight": (C, E)), w-conditioned kinds only
    <adapter>/adapter.json                       AdapterMeta

A plain LoRA file (`<name>.safetensors` as other tools write it: kohya / A1111, diffusers or peft keys; no
adapter.json) is a style adapter too: its metadata comes from its weights and the model it is loaded on
(`loaded.py`), its keys go through diffusers' converters (`keys.py`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Literal, get_args

import torch
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass as validated_dataclass
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

LORA_FILE = "pytorch_lora_weights.safetensors"
PROJECTION_FILE = "guidance_projection.safetensors"
META_FILE = "adapter.json"
W_CONDITIONED = ("guidance", "consistency", "progressive")  # single-eval, w through the w projection
STEP_DISTILLED = ("consistency", "progressive")  # few-step: their own scheduler and step counts
Kind = Literal["guidance", "consistency", "progressive", "style"]
KINDS = get_args(Kind)
Steps = Annotated[int, Field(ge=1)]


class AdapterError(ValueError):
    """An adapter that cannot be used: wrong base, bad files, unsafe path. The message says why."""


class OtherBase(AdapterError):
    """An intact adapter made for another base model (an adapters root may hold several bases' adapters)."""


# Validated whenever one is made (pydantic), read strictly from adapter.json: a wrong type, an unknown field or a
# value out of range is refused at load with the file and the field named, never a failure at the first request
# (a rank of 0 divides by zero in every call). Scheduler names and the step cap are the sampling plan's rules:
# the server asks the plan at load (serving/engine.py: check_sampling), so they are not repeated here.
@validated_dataclass(config=ConfigDict(extra="forbid", allow_inf_nan=False))
class AdapterMeta:
    kind: Kind  # "guidance": single-evaluation guided sampling; "consistency" / "progressive": the same in few
    # steps; "style": a plain LoRA
    base_fingerprint: str
    rank: Annotated[int, Field(ge=1)]
    alpha: float  # LoRA scale alpha / rank; finite
    target_modules: list[str]
    w_min: float = 0.0
    w_max: float = 0.0
    embedding_dim: Annotated[int, Field(ge=0)] = 0
    recommended_scheduler: str = "ddim"
    recommended_steps: Steps = 25
    schedulers: list[str] = field(default_factory=list)  # the schedulers it can be sampled with; [] = any
    steps: list[Steps] = field(default_factory=list)  # the step counts it supports; [] = any
    scheduler_config: dict = field(default_factory=dict)  # overrides of the base's scheduler config
    training: dict = field(default_factory=dict)

    @model_validator(mode="after")
    def _w_range(self) -> AdapterMeta:
        if self.w_min > self.w_max:
            raise ValueError(f"w_min {self.w_min} is above w_max {self.w_max} (allowed: w_min <= w_max)")
        return self

    @classmethod
    def read(cls, folder: Path) -> AdapterMeta:
        """`folder`'s adapter.json, strictly typed; AdapterError naming the file, and each field and value wrong."""
        path = Path(folder) / META_FILE
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise AdapterError(f"{path} not found: an adapter folder needs {META_FILE}") from None
        except UnicodeDecodeError as exc:
            raise AdapterError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): write it as UTF-8 "
                               f"JSON") from None
        except OSError as exc:
            raise AdapterError(f"{path} cannot be read: {exc}") from None
        try:
            return _META.validate_json(text, strict=True)
        except ValidationError as exc:
            raise AdapterError(f"{path} is not valid adapter metadata: {_problems(exc)}") from None


_META = TypeAdapter(AdapterMeta)


def _problems(exc: ValidationError) -> str:
    """Each of pydantic's errors as "field: problem (got value)", the field as a path ("steps[2]")."""
    out = []
    for err in exc.errors(include_url=False):
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in err["loc"]).lstrip(".")
        if err["type"] == "unexpected_keyword_argument":
            out.append(f"{where}: unknown field (allowed: {', '.join(f.name for f in fields(AdapterMeta))})")
            continue
        got = f" (got {repr(err['input'])[:60]})" if where and err["type"] != "missing" else ""
        out.append(f"{where or 'the file'}: {err['msg'].removeprefix('Value error, ')}{got}")
    return "; ".join(out)


def save_adapter(folder: Path, unet, adapter_name: str, meta: AdapterMeta, projection: nn.Linear | None) -> None:
    """Write a peft-wrapped UNet's adapter `adapter_name` (diffusers' own LoRA writer) and its metadata as
    `folder`, replacing any earlier one whole."""
    from diffusers import StableDiffusionPipeline  # the writers: distillers only, not the server's start-up
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from distillery.atomic import atomic_folder

    lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter_name))
    with atomic_folder(folder) as staging:  # a server scanning the root sees the old adapter or the new, never half
        StableDiffusionPipeline.save_lora_weights(staging, unet_lora_layers={k: v.detach().float().contiguous() for k, v in lora.items()},
                                                  safe_serialization=True)
        if projection is not None:
            save_file({"weight": projection.weight.detach().float().contiguous()}, str(staging / PROJECTION_FILE))
        (staging / META_FILE).write_text(json.dumps(asdict(meta), indent=1) + "\n")


@dataclass
class AdapterFiles:
    meta: AdapterMeta
    lora: dict[str, torch.Tensor]  # "unet."-prefixed peft keys
    projection: torch.Tensor | None  # (C, E)


def read_adapter(folder: Path, base_fingerprint: str) -> AdapterFiles:
    """Read and check an adapter folder; refuses a different base, non-safetensors or corrupt files."""
    folder = Path(folder)
    meta = AdapterMeta.read(folder)
    if meta.base_fingerprint != base_fingerprint:
        raise OtherBase(f"adapter {folder.name!r} was trained on base model {meta.base_fingerprint}, but the loaded "
                        f"base is {base_fingerprint}; retrain it on this base or load the base it was made for")
    lora = _load_safetensors(folder / LORA_FILE)
    if not lora or not all(k.startswith("unet.") and "lora" in k for k in lora):
        raise AdapterError(f"{folder / LORA_FILE} holds no UNet LoRA weights in diffusers format")
    projection = None
    if meta.kind in W_CONDITIONED:
        projection = _load_safetensors(folder / PROJECTION_FILE).get("weight")
        if projection is None or projection.dim() != 2 or projection.shape[1] != meta.embedding_dim:
            got = "none" if projection is None else f"{tuple(projection.shape)}"
            raise AdapterError(f"{folder / PROJECTION_FILE}: expected 'weight' of shape (C, {meta.embedding_dim}) "
                               f"(embedding_dim in {META_FILE}), got {got}")
        if not torch.isfinite(projection).all():
            raise AdapterError(f"{folder / PROJECTION_FILE}: 'weight' holds NaN or infinite values")
    return AdapterFiles(meta, lora, projection)


def read_lora_file(path: Path) -> dict[str, torch.Tensor]:
    """A plain LoRA file's tensors (any layout diffusers reads; checked by `keys.unet_lora_pairs`)."""
    if path.suffix != ".safetensors":
        raise AdapterError(f"{path}: an adapter is a folder with {META_FILE} or a LoRA .safetensors file")
    return _load_safetensors(path)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AdapterError(f"{path} not found (adapters are safetensors files only)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{path} is not a readable safetensors file: {exc}") from None
