"""An adapter made resident (its LoRA factors and w projection in owned memory), and sets of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from distillery.adapters.files import (W_CONDITIONED, AdapterError, AdapterMeta, read_adapter,
                                       read_lora_file)
from distillery.adapters.keys import fit_to_layer, unet_lora_pairs

AdapterSet = tuple[tuple["LoadedAdapter", float], ...]  # (adapter, weight) pairs: what one image row uses


@dataclass(eq=False)
class LoadedAdapter:
    name: str
    path: Path
    meta: AdapterMeta
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> A (r, K), B (N, r), owned
    projection: torch.Tensor | None  # (C, E) for guidance-distilled adapters

    @property
    def single_eval(self) -> bool:
        return self.meta.kind in W_CONDITIONED

    @property
    def scale(self) -> float:
        return self.meta.alpha / self.meta.rank

    @property
    def nbytes(self) -> int:
        tensors = [t for ab in self.layers.values() for t in ab] + ([self.projection] if self.projection is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def set_key(chosen: AdapterSet) -> tuple[tuple[str, float], ...]:
    """An adapter set by its adapters' names and weights: its identity in caches and in batch order."""
    return tuple((a.name, weight) for a, weight in chosen)


def plain_lora_meta(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], base_fingerprint: str) -> AdapterMeta:
    """A plain LoRA file's metadata: a style adapter at scale 1 (its alphas are folded into B per layer). The
    file cannot say which base it was made for: it takes the model's, and every layer is checked against it."""
    rank = max(a.shape[0] for a, _ in layers.values())
    return AdapterMeta(kind="style", base_fingerprint=base_fingerprint, rank=rank, alpha=float(rank),
                       target_modules=sorted(layers))


def read_loaded(name: str, path: Path, model) -> LoadedAdapter:
    """Read and check an adapter folder, or a plain LoRA .safetensors file, against `model` (whose UNet has
    serving layers), in owned memory. Every failure is an AdapterError naming the file: one bad adapter is
    refused (400) or skipped at start, never a server that cannot start."""
    path = Path(path)
    try:
        return _read_loaded(name, path, model)
    except AdapterError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever else reading these files raised (a library's own error)
        raise AdapterError(f"{path}: cannot be read as an adapter: {type(exc).__name__}: {exc}") from exc


def _read_loaded(name: str, path: Path, model) -> LoadedAdapter:
    if path.is_file():
        lora, meta, projection = read_lora_file(path), None, None
    else:
        files = read_adapter(path, model.fingerprint)
        lora, meta, projection = files.lora, files.meta, files.projection
    unet = model.unet
    layers = {}
    for layer, (a, b) in unet_lora_pairs(lora, path).items():
        try:
            served = unet.get_submodule(layer)
        except AttributeError:
            raise AdapterError(f"{path}: layer {layer!r} does not exist in the base UNet (made for another "
                               f"base?)") from None
        if not hasattr(served, "base"):  # every Linear and zero-padded ungrouped Conv2d is a serving layer
            raise AdapterError(f"{path}: layer {layer!r} is {type(served).__name__}; LoRA is served on Linear "
                               f"and zero-padded ungrouped Conv2d layers")
        layers[layer] = fit_to_layer(path, layer, served.base, a, b)
    proj = projection.to(device=unet.device, dtype=unet.dtype, copy=True) if projection is not None else None
    if proj is not None and proj.shape[0] != unet.time_embedding.linear_1.in_features:
        raise AdapterError(f"{path}: w projection has {proj.shape[0]} outputs; the UNet's timestep embedding "
                           f"takes {unet.time_embedding.linear_1.in_features}")
    return LoadedAdapter(name, path, meta or plain_lora_meta(layers, model.fingerprint), layers, proj)
