"""A UNet call's adapter sets, each joined by rank for per-row LoRA: A = [A1; A2], B = [s1 B1, s2 B2] (cached).

A composition is a `kernels.LoRAWeights` per layer, one set index per distinct set of the call: made
once, it also keeps what the kernels read every call (the scales on the device and as host floats;
A and B padded for Triton on first use).
"""

from __future__ import annotations

from cachetools import LRUCache

from distillery.adapters.loaded import AdapterSet, set_key
from distillery.kernels import LoRAWeights

MAX_CACHED_COMPOSITIONS = 16  # composed call sets: each holds zero-padded copies of its adapters' factors


def compose_layer(layer: str, call_sets: list[AdapterSet]) -> LoRAWeights:
    """A (S, R, K) (or (S, R, C, k, k) for a k x k conv), B (S, N, R), scales (S,) and each set's own rank
    (the torch path skips the zero padding up to the largest R). Weights and scales are folded into B,
    so the scales are all 1."""
    parts = [[(a.layers[layer], weight * a.scale) for a, weight in chosen if layer in a.layers] for chosen in call_sets]
    if len(parts) == 1 and len(parts[0]) == 1 and parts[0][0][1] == 1.0:  # one adapter at scale 1: views, no copy
        (a, b), _ = parts[0][0]
        return LoRAWeights.of(a[None], b[None], [1.0], (a.shape[0],))
    a0, b0 = next(ab for p in parts for ab, _ in p)
    ranks = [sum(ab[0].shape[0] for ab, _ in p) for p in parts]
    r_max = max(ranks) or 1
    lora_a = a0.new_zeros(len(parts), r_max, *a0.shape[1:])
    lora_b = b0.new_zeros(len(parts), b0.shape[0], r_max)
    for s, p in enumerate(parts):
        r0 = 0
        for (a, b), scale in p:
            lora_a[s, r0:r0 + a.shape[0]] = a
            lora_b[s, :, r0:r0 + a.shape[0]] = b * scale
            r0 += a.shape[0]
    return LoRAWeights.of(lora_a, lora_b, [1.0] * len(parts), ranks)


class Compositions:
    """Composed sets per layer, cached by the call's sets (not by the row pattern, which changes with every
    request's arrival: compositions are the bytes worth keeping). On the torch thread only."""

    def __init__(self, max_cached: int = MAX_CACHED_COMPOSITIONS):
        self._cache: LRUCache[tuple, dict[str, LoRAWeights]] = LRUCache(max_cached)

    def clear(self) -> None:
        self._cache.clear()

    def of(self, call_sets: list[AdapterSet], layers: set[str]) -> dict[str, LoRAWeights]:
        key = (tuple(set_key(chosen) for chosen in call_sets), frozenset(layers))
        composed = self._cache.get(key)  # a hit is marked most recently used
        if composed is None:
            composed = self._cache[key] = {layer: compose_layer(layer, call_sets) for layer in layers}
        return composed
