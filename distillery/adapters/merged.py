"""Merged weights per adapter set, W0 + sum_i w_i s_i B_i A_i for each layer it touches, cached within a byte budget."""

from __future__ import annotations

from collections import OrderedDict

import torch

from distillery.adapters.loaded import AdapterSet, set_key


def default_merged_budget(device: torch.device) -> int:
    """Merged weights on CPU (per-row LoRA in torch cost 7-19% per UNet call there, merged -4% to +4%:
    bench lora_overhead), per-row LoRA on CUDA (the fused kernel, no copies of W0's layers)."""
    return 0 if device.type == "cuda" else 2 << 30


def _nbytes(merged: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in merged.values())


class MergedWeights:
    """W0 itself is never touched: each merged layer is a new tensor. On the torch thread only."""

    def __init__(self, unet, budget_bytes: int):
        self.unet, self.budget_bytes = unet, budget_bytes
        self._cache: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()

    def clear(self) -> None:
        self._cache.clear()

    def of(self, chosen: AdapterSet) -> dict[str, torch.Tensor]:
        """The set's merged layers (cached). Deterministic: a set merged again after eviction gets the same bits."""
        key = set_key(chosen)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        merged = {}
        for layer in sorted({layer for a, _ in chosen for layer in a.layers}):
            weight = self.unet.get_submodule(layer).base.weight.clone()
            for a, set_weight in chosen:
                if layer in a.layers:
                    lora_a, lora_b = a.layers[layer]
                    weight.view(weight.shape[0], -1).addmm_(lora_b, lora_a.reshape(lora_a.shape[0], -1),
                                                            alpha=set_weight * a.scale)
            merged[layer] = weight
        self._cache[key] = merged
        return merged

    def trim(self, keep: set[tuple]) -> bool:
        """Evict least recently used sets beyond the budget, never those in `keep` (the running call's).
        True if any went (batches cached with their weights must go too)."""
        total = sum(_nbytes(m) for m in self._cache.values())
        evicted = False
        for key in [k for k in self._cache if k not in keep]:
            if total <= self.budget_bytes:
                break
            total -= _nbytes(self._cache.pop(key))
            evicted = True
        return evicted
