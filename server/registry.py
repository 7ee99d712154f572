"""Adapters loaded into the one base UNet, by name; activating one reloads and copies nothing.

Internal peft adapter names are generated ("adapter_0", ...) rather than taken from users:
with peft, an adapter whose name is a substring of another's keys can clobber it (peft#3780).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from server.adapters import AdapterError, AdapterMeta, read_adapter
from server.guidance import install_projection
from server.model import DiffusionModel


class UnknownAdapter(KeyError):
    pass


class GuidanceOutOfRange(AdapterError):
    pass


@dataclass
class LoadedAdapter:
    name: str
    internal_name: str
    meta: AdapterMeta
    projection: nn.Linear | None

    @property
    def single_eval(self) -> bool:
        return self.meta.kind == "guidance"


def guidance_adapter(chosen: list[tuple[LoadedAdapter, float]]) -> LoadedAdapter | None:
    """The set's guidance-distilled adapter (it makes sampling single-eval), if any; at most one is allowed."""
    distilled = [a for a, _ in chosen if a.single_eval]
    if len(distilled) > 1:
        raise AdapterError(f"at most one guidance-distilled adapter per request, got {[a.name for a in distilled]}")
    return distilled[0] if distilled else None


def check_guidance(chosen: list[tuple[LoadedAdapter, float]], w: float) -> None:
    """A guidance-distilled adapter only knows the w range it was trained on."""
    distilled = guidance_adapter(chosen)
    if distilled and not distilled.meta.w_min <= w <= distilled.meta.w_max:
        raise GuidanceOutOfRange(f"guidance {w} is outside adapter {distilled.name!r}'s trained range "
                                 f"[{distilled.meta.w_min}, {distilled.meta.w_max}]")


def activate(unet, chosen: list[tuple[LoadedAdapter, float]]) -> None:
    """Make exactly `chosen` (adapter, weight) pairs active on the shared UNet; [] is plain W0.

    peft sums the weighted LoRA deltas, which equals rank concatenation A = [A1; A2], B = [s1 B1, s2 B2].
    """
    distilled = guidance_adapter(chosen)
    if chosen:
        unet.enable_adapters()
        unet.set_adapters([a.internal_name for a, _ in chosen], weights=[w for _, w in chosen])
    elif getattr(unet, "_hf_peft_config_loaded", False):
        unet.disable_adapters()
    install_projection(unet, distilled.projection if distilled else None)


class AdapterRegistry:
    def __init__(self, model: DiffusionModel):
        self.model = model
        self.adapters: dict[str, LoadedAdapter] = {}
        self._ids = itertools.count()

    def load(self, name: str, folder: str | Path) -> LoadedAdapter:
        if name in self.adapters:
            raise AdapterError(f"an adapter named {name!r} is already loaded")
        files = read_adapter(Path(folder), self.model.fingerprint)
        internal = f"adapter_{next(self._ids)}"
        unet = self.model.unet
        unet.load_lora_adapter(files.lora, prefix="unet", adapter_name=internal)
        projection = None
        if files.projection is not None:
            projection = nn.Linear(files.projection.shape[1], files.projection.shape[0], bias=False)
            with torch.no_grad():
                projection.weight.copy_(files.projection)  # owned memory, not the file's mapping
            projection.to(device=unet.device, dtype=unet.dtype).requires_grad_(False)
        adapter = LoadedAdapter(name, internal, files.meta, projection)
        self.adapters[name] = adapter
        activate(unet, [])  # loading leaves the new adapter active in peft; the base stays the default
        return adapter

    def get(self, name: str) -> LoadedAdapter:
        if name not in self.adapters:
            raise UnknownAdapter(f"unknown adapter {name!r}; available: {sorted(self.adapters)}")
        return self.adapters[name]
