"""The merged backend: adapter sets run on merged weights, W0 + sum_i w_i s_i B_i A_i per layer they touch.

A call whose rows all use one set runs entirely on that set's merged weights (no LoRA FLOPs). A call of
several sets (or some base rows) runs each set's rows through its merged weights in the Linear layers
(a GEMM per set) and takes per-row LoRA in the convolutions, as the per-row backend does. Merged
weights are cached within a byte budget (the server's `merged_cache_bytes`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from distillery.adapters.backends.per_row import PerRowBackend, touched_layers
from distillery.adapters.layers import CallPlan, LoRAContext, ServingLinear
from distillery.adapters.loaded import AdapterSet, set_key
from distillery.kernels import segments_of


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
        # least recently used first; an OrderedDict, not a cachetools.LRUCache: the running call's sets stay
        # even when together they exceed the budget, so eviction waits until all of them are merged
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
        True if any went (plans cached with their weights must go too)."""
        total = sum(_nbytes(m) for m in self._cache.values())
        evicted = False
        for key in [k for k in self._cache if k not in keep]:
            if total <= self.budget_bytes:
                break
            total -= _nbytes(self._cache.pop(key))
            evicted = True
        return evicted


class MergedBackend(PerRowBackend):
    """The per-row backend's plans, with merged weights wherever they replace LoRA."""

    name = "merged"

    def __init__(self, model, context: LoRAContext, budget_bytes: int):
        super().__init__(model, context)
        self.weights = MergedWeights(model.unet, budget_bytes)

    @property
    def budget_bytes(self) -> int:
        return self.weights.budget_bytes

    @budget_bytes.setter
    def budget_bytes(self, value: int) -> None:
        self.weights.budget_bytes = value

    def clear(self) -> None:
        super().clear()
        self.weights.clear()

    def add_weights(self, plan: CallPlan, call_sets: list[AdapterSet], set_of_row: list[int]) -> None:
        """Every row on one set -> that set's merged weights; several sets -> Linear layers run each set's
        rows on its merged weights, convolutions per-row LoRA."""
        merged = [self.weights.of(chosen) for chosen in call_sets]
        if self.weights.trim(keep={set_key(chosen) for chosen in call_sets}):
            self._plans.clear()  # they may hold an evicted set's weights
        if len(call_sets) == 1 and -1 not in set_of_row:
            plan.merged = merged[0]
            return
        plan.set_merged, plan.segments_with_base = merged, segments_of(set_of_row, with_base=True)
        plan.layers = self.compositions.of(call_sets, {layer for layer in touched_layers(call_sets) if not isinstance(
            self.unet.get_submodule(layer), ServingLinear)})
