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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

LORA_FILE = "pytorch_lora_weights.safetensors"
PROJECTION_FILE = "guidance_projection.safetensors"
META_FILE = "adapter.json"
W_CONDITIONED = ("guidance", "consistency", "progressive")  # single-eval, w through the w projection
STEP_DISTILLED = ("consistency", "progressive")  # few-step: their own scheduler and step counts
KINDS = (*W_CONDITIONED, "style")


class AdapterError(ValueError):
    """An adapter that cannot be used: wrong base, bad files, unsafe path. The message says why."""


@dataclass
class AdapterMeta:
    kind: str  # "guidance": single-evaluation guided sampling; "consistency" / "progressive": the same in few
    # steps; "style": a plain LoRA
    base_fingerprint: str
    rank: int
    alpha: float
    target_modules: list[str]
    w_min: float = 0.0
    w_max: float = 0.0
    embedding_dim: int = 0
    recommended_scheduler: str = "ddim"
    recommended_steps: int = 25
    schedulers: list[str] = field(default_factory=list)  # the schedulers it can be sampled with; [] = any
    steps: list[int] = field(default_factory=list)  # the step counts it supports; [] = any
    scheduler_config: dict = field(default_factory=dict)  # overrides of the base's scheduler config
    training: dict = field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path) -> AdapterMeta:
        path = Path(folder) / META_FILE
        try:
            raw = json.loads(path.read_text())
            meta = cls(**raw)
        except FileNotFoundError:
            raise AdapterError(f"{path} not found: an adapter folder needs {META_FILE}") from None
        except (json.JSONDecodeError, TypeError) as exc:
            raise AdapterError(f"{path} is not valid adapter metadata: {exc}") from None
        if meta.kind not in KINDS:
            raise AdapterError(f"{path}: kind must be one of {KINDS}, got {meta.kind!r}")
        return meta


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
        raise AdapterError(f"adapter {folder.name!r} was trained on base model {meta.base_fingerprint}, but the loaded "
                           f"base is {base_fingerprint}; retrain it on this base or load the base it was made for")
    lora = _load_safetensors(folder / LORA_FILE)
    if not lora or not all(k.startswith("unet.") and "lora" in k for k in lora):
        raise AdapterError(f"{folder / LORA_FILE} holds no UNet LoRA weights in diffusers format")
    projection = None
    if meta.kind in W_CONDITIONED:
        projection = _load_safetensors(folder / PROJECTION_FILE).get("weight")
        if projection is None or projection.shape[1] != meta.embedding_dim:
            raise AdapterError(f"{folder / PROJECTION_FILE}: expected 'weight' of shape (C, {meta.embedding_dim})")
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
