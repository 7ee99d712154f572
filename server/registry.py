"""Adapters resident beside the one base UNet, by name, within a byte budget (LRU).

Each adapter's LoRA factors are copied once, at load, into owned memory (not the file's
memory map: the first write into a mapping pays page faults). Switching the adapters a
batch uses builds an `AdapterBatch` of views and small concatenations: nothing is reloaded
and W0 is never copied. Internal layer keys come from the file, never from user-given
names (peft#3780: with peft's hotswap an adapter whose name is a substring of another's
keys can wipe it; here a name is only a dictionary key).

Threads: residency (`resident`, `known`, `in_use`) is guarded by a lock held only for dict
updates, never during file reads or merges, so the event loop (acquire, release, lookups)
never waits on disk or torch. Compositions and merged weights are made and used on the
torch thread only; adapters leaving bump a generation that drops them there.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kernels import segments_of
from server.adapters import AdapterError, AdapterMeta, read_adapter
from server.lora_layers import AdapterBatch, LoRAContext, ServingLinear, install_serving_layers
from server.model import DiffusionModel

AdapterSet = tuple[tuple["LoadedAdapter", float], ...]  # (adapter, weight) pairs
MAX_CACHED_BATCHES = 64  # row patterns (steady batches and switches back cost a lookup)
MAX_CACHED_COMPOSITIONS = 16  # composed slot sets: each holds zero-padded copies of its adapters' factors


class UnknownAdapter(KeyError):
    pass


class AdapterInUse(AdapterError):
    pass


class GuidanceOutOfRange(AdapterError):
    pass


@dataclass(eq=False)
class LoadedAdapter:
    name: str
    path: Path
    meta: AdapterMeta
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> A (r, K), B (N, r), owned
    projection: torch.Tensor | None  # (C, E) for guidance-distilled adapters

    @property
    def single_eval(self) -> bool:
        return self.meta.kind == "guidance"

    @property
    def scale(self) -> float:
        return self.meta.alpha / self.meta.rank

    @property
    def nbytes(self) -> int:
        tensors = [t for ab in self.layers.values() for t in ab] + ([self.projection] if self.projection is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def set_key(chosen: AdapterSet) -> tuple[tuple[str, float], ...]:
    """An adapter set by its adapters' names and weights: its identity in caches and in batch order."""
    return tuple((a.name, w) for a, w in chosen)


def guidance_adapter(chosen: AdapterSet) -> LoadedAdapter | None:
    """The set's guidance-distilled adapter (it makes sampling single-eval), if any; at most one is allowed."""
    distilled = [a for a, _ in chosen if a.single_eval]
    if len(distilled) > 1:
        raise AdapterError(f"at most one guidance-distilled adapter per request, got {[a.name for a in distilled]}")
    return distilled[0] if distilled else None


def check_guidance(chosen: AdapterSet, w: float) -> None:
    """A guidance-distilled adapter only knows the w range it was trained on."""
    distilled = guidance_adapter(chosen)
    if distilled and not distilled.meta.w_min <= w <= distilled.meta.w_max:
        raise GuidanceOutOfRange(f"guidance {w} is outside adapter {distilled.name!r}'s trained range "
                                 f"[{distilled.meta.w_min}, {distilled.meta.w_max}]")


def _parse_lora(lora: dict[str, torch.Tensor], folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers ("lora.down/up") or peft ("lora_A/B") keys -> {layer: (A, B)}."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora.items():
        for down, up in ((".lora.down.weight", ".lora.up.weight"), (".lora_A.weight", ".lora_B.weight")):
            for suffix, part in ((down, "A"), (up, "B")):
                if key.endswith(suffix):
                    pairs.setdefault(key[len("unet."):-len(suffix)], {})[part] = tensor
    if not pairs or any(len(p) != 2 for p in pairs.values()):
        raise AdapterError(f"{folder}: LoRA keys must come in down/up (A/B) pairs per layer")
    return {layer: (p["A"], p["B"]) for layer, p in pairs.items()}


def _fit(folder: Path, layer: str, base: nn.Module, a: torch.Tensor, b: torch.Tensor):
    """A LoRA pair checked against its base layer, in owned memory: A (r, K) and B (N, r) for a Linear
    or a 1 x 1 conv, A (r, C, k, k) and B (N, r) for a k x k conv (peft's conv layout)."""
    if isinstance(base, nn.Linear):
        want_a, want_b = (base.in_features,), (base.out_features,)
    else:  # nn.Conv2d
        out_ch, in_ch, kh, kw = base.weight.shape
        want_a, want_b = (in_ch, kh, kw), (out_ch, 1, 1)
    if a.shape[1:] != want_a or b.shape[0] != want_b[0] or b.shape[2:] != want_b[1:] or a.shape[0] != b.shape[1]:
        raise AdapterError(f"{folder}: layer {layer!r} has A {tuple(a.shape)}, B {tuple(b.shape)}; the base "
                           f"layer's weight is {tuple(base.weight.shape)}")
    if a.dim() == 4 and a.shape[2:] == (1, 1):
        a = a.flatten(1)  # a 1 x 1 conv is linear over channels
    b = b.flatten(1)
    own = dict(device=base.weight.device, dtype=base.weight.dtype, copy=True)  # resident memory, not the mmap
    return a.to(**own).contiguous(), b.to(**own).contiguous()


def default_merged_budget(device: torch.device) -> int:
    """Merged weights on CPU (per-row LoRA in torch cost 7-19% per UNet call there, merged -4% to +4%:
    bench lora_overhead), per-row LoRA on CUDA (the fused kernel, no copies of W0's layers)."""
    return 0 if device.type == "cuda" else 2 << 30


class AdapterRegistry:
    """The adapters served on one model. Making one installs the serving layers into its UNet: an
    explicit step (the server's start-up, a benchmark's set-up), done once per model copy."""

    def __init__(self, model: DiffusionModel, budget_bytes: int | None = None, merged_budget_bytes: int | None = None):
        self.model = model
        self.budget_bytes = budget_bytes
        self._generation = self._cache_generation = 0  # bumped when an adapter leaves: cached compositions go
        self._batches: OrderedDict[tuple, AdapterBatch] = OrderedDict()  # per-call slots, by row pattern
        self._compositions: OrderedDict[tuple, dict[str, tuple]] = OrderedDict()  # composed LoRA, by slot sets
        self._merged: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()  # W0 + sum s B A, by adapter set
        # > 0: a call whose rows all use one adapter set runs on that set's merged weights (W0 + BA, cached up
        # to this many bytes; the running call's set always stays); 0: always per-row LoRA.
        self.merged_budget_bytes = default_merged_budget(model.device) if merged_budget_bytes is None else merged_budget_bytes
        self.context = LoRAContext()
        self.resident: OrderedDict[str, LoadedAdapter] = OrderedDict()  # least recently used first
        self.known: dict[str, Path] = {}  # every registered adapter, resident or evicted
        self.in_use: Counter[str] = Counter()
        self.loads = self.evictions = 0
        self._lock = threading.Lock()
        install_serving_layers(model.unet, self.context)

    @property
    def merged_budget_bytes(self) -> int:
        return self._merged_budget_bytes

    @merged_budget_bytes.setter
    def merged_budget_bytes(self, value: int) -> None:
        self._merged_budget_bytes = value
        self._forget_compositions()  # cached slots were composed under the old budget

    @property
    def resident_bytes(self) -> int:
        return sum(a.nbytes for a in self.resident.values())

    def load(self, name: str, folder: str | Path) -> LoadedAdapter:
        """Read, check and make resident; on any error nothing is loaded and nothing changes."""
        if name in self.known:
            raise AdapterError(f"an adapter named {name!r} is already registered")
        adapter = self._read(name, Path(folder))  # disk and copies: outside the lock
        with self._lock:
            if name in self.known:
                raise AdapterError(f"an adapter named {name!r} is already registered")
            self._make_resident(adapter)
            self.known[name] = adapter.path
            return adapter

    def _read(self, name: str, folder: Path) -> LoadedAdapter:
        files = read_adapter(folder, self.model.fingerprint)
        unet = self.model.unet
        layers = {}
        for layer, (a, b) in _parse_lora(files.lora, folder).items():
            try:
                base = unet.get_submodule(layer)
            except AttributeError:
                raise AdapterError(f"{folder}: layer {layer!r} does not exist in the base UNet") from None
            if not hasattr(base, "base"):  # every Linear and zero-padded ungrouped Conv2d is a serving layer
                raise AdapterError(f"{folder}: layer {layer!r} is {type(base).__name__}; LoRA is served on Linear "
                                   f"and zero-padded ungrouped Conv2d layers")
            layers[layer] = _fit(folder, layer, base.base, a, b)
        proj = files.projection.to(device=unet.device, dtype=unet.dtype, copy=True) if files.projection is not None else None
        if proj is not None and proj.shape[0] != unet.time_embedding.linear_1.in_features:
            raise AdapterError(f"{folder}: w projection has {proj.shape[0]} outputs; the UNet's timestep embedding "
                               f"takes {unet.time_embedding.linear_1.in_features}")
        self.loads += 1
        return LoadedAdapter(name, folder, files.meta, layers, proj)

    def _make_resident(self, adapter: LoadedAdapter) -> None:
        """Under the lock: evict least recently used adapters not in use until `adapter` fits the budget."""
        if self.budget_bytes is not None:
            for victim in [n for n in self.resident if not self.in_use[n]]:
                if self.resident_bytes + adapter.nbytes <= self.budget_bytes:
                    break
                del self.resident[victim]
                self.evictions += 1
                self._forget_compositions()
            if self.resident_bytes + adapter.nbytes > self.budget_bytes:
                raise AdapterError(f"adapter {adapter.name!r} ({adapter.nbytes} bytes) does not fit the resident budget "
                                   f"of {self.budget_bytes} bytes next to the adapters in use")
        self.resident[adapter.name] = adapter

    def resident_or_none(self, name: str) -> LoadedAdapter | None:
        """The adapter if it is resident (marked most recently used), None if evicted; never touches disk.
        UnknownAdapter if no adapter has that name."""
        with self._lock:
            if name not in self.known:
                raise UnknownAdapter(f"unknown adapter {name!r}; available: {sorted(self.known)}")
            adapter = self.resident.get(name)
            if adapter is not None:
                self.resident.move_to_end(name)
            return adapter

    def get(self, name: str) -> LoadedAdapter:
        """A resident adapter, read back from disk if it was evicted (so: not on the event loop)."""
        adapter = self.resident_or_none(name)
        if adapter is not None:
            return adapter
        adapter = self._read(name, self.known[name])
        with self._lock:
            if name not in self.known:
                raise UnknownAdapter(f"unknown adapter {name!r}; available: {sorted(self.known)}")
            if name not in self.resident:  # nobody else read it back meanwhile
                self._make_resident(adapter)
            self.resident.move_to_end(name)
            return self.resident[name]

    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self.known:
                raise UnknownAdapter(f"unknown adapter {name!r}; available: {sorted(self.known)}")
            if self.in_use[name]:
                raise AdapterInUse(f"adapter {name!r} is in use by {self.in_use[name]} request(s); retry when they finish")
            self.resident.pop(name, None)
            del self.known[name]
            self._forget_compositions()

    def _forget_compositions(self) -> None:
        """Cached slots and merged weights name adapters: they go when any adapter leaves (dropped on the
        torch thread, at its next `batch`)."""
        self._generation += 1

    def acquire(self, chosen: AdapterSet) -> None:
        """Mark a request's adapters in use: neither evicted nor unloaded until `release`."""
        with self._lock:
            self.in_use.update(a.name for a, _ in chosen)

    def release(self, chosen: AdapterSet) -> None:
        with self._lock:
            self.in_use.subtract(a.name for a, _ in chosen)

    def batch(self, row_sets: list[AdapterSet]) -> AdapterBatch:
        """Slots for one UNet call (cached by row pattern: steady batches and switches back cost a lookup).
        On the torch thread."""
        if self._cache_generation != self._generation:
            self._cache_generation = self._generation
            self._batches.clear()
            self._compositions.clear()
            self._merged.clear()
        pattern = tuple(set_key(chosen) for chosen in row_sets)
        batch = self._batches.get(pattern)
        if batch is None:
            batch = self._batches[pattern] = self._build_batch(row_sets)
            while len(self._batches) > MAX_CACHED_BATCHES:
                self._batches.popitem(last=False)
        self._batches.move_to_end(pattern)
        return batch

    def _build_batch(self, row_sets: list[AdapterSet]) -> AdapterBatch:
        """A slot per distinct non-empty set. Merging on: every row on one set -> that set's merged weights;
        several sets -> Linear layers run each slot's rows on its merged weights, convolutions per-row LoRA.
        Merging off: per-row LoRA everywhere, slots composed by rank concatenation."""
        keys: dict[tuple, int] = {}
        slot_sets: list[AdapterSet] = []
        row_slot = []
        for chosen in row_sets:
            if not chosen:
                row_slot.append(-1)
                continue
            key = set_key(chosen)
            if key not in keys:
                keys[key] = len(slot_sets)
                slot_sets.append(chosen)
            row_slot.append(keys[key])
        batch = AdapterBatch(torch.tensor(row_slot, dtype=torch.long, device=self.model.device),
                             segments=segments_of(row_slot))
        batch.projections = [(d.projection if (d := guidance_adapter(chosen)) else None) for chosen in slot_sets]
        touched = {layer for chosen in slot_sets for a, _ in chosen for layer in a.layers}
        if self.merged_budget_bytes > 0:
            merged = [self._merged_weights(chosen) for chosen in slot_sets]
            self._trim_merged(keep={set_key(chosen) for chosen in slot_sets})
            if len(slot_sets) == 1 and -1 not in row_slot:
                batch.merged = merged[0]
                return batch
            batch.slot_merged, batch.all_segments = merged, segments_of(row_slot, with_base=True)
            touched = {layer for layer in touched if not isinstance(self.model.unet.get_submodule(layer), ServingLinear)}
        batch.layers = self._composed(slot_sets, touched)
        return batch

    def _composed(self, slot_sets: list[AdapterSet], layers: set[str]) -> dict[str, tuple]:
        """Per-row LoRA slots for these layers, cached by the slot sets (not by the row pattern, which
        changes with every request's arrival: compositions are the bytes worth keeping)."""
        key = (tuple(set_key(chosen) for chosen in slot_sets), frozenset(layers))
        composed = self._compositions.get(key)
        if composed is None:
            composed = self._compositions[key] = {layer: self._compose_layer(layer, slot_sets) for layer in layers}
            while len(self._compositions) > MAX_CACHED_COMPOSITIONS:
                self._compositions.popitem(last=False)
        self._compositions.move_to_end(key)
        return composed

    def _merged_weights(self, chosen: AdapterSet) -> dict[str, torch.Tensor]:
        """W0 + sum_i w_i s_i B_i A_i for every layer the set touches (W0 itself untouched), cached.
        Deterministic: a set merged again after eviction gets the same bits."""
        key = set_key(chosen)
        if key in self._merged:
            self._merged.move_to_end(key)
            return self._merged[key]
        unet = self.model.unet
        merged = {}
        for layer in sorted({layer for a, _ in chosen for layer in a.layers}):
            w = unet.get_submodule(layer).base.weight.clone()
            for a, weight in chosen:
                if layer in a.layers:
                    lora_a, lora_b = a.layers[layer]
                    w.view(w.shape[0], -1).addmm_(lora_b, lora_a.reshape(lora_a.shape[0], -1), alpha=weight * a.scale)
            merged[layer] = w
        self._merged[key] = merged
        return merged

    def _trim_merged(self, keep: set[tuple]) -> None:
        """Evict least recently used merged sets beyond the budget (never those in `keep`, the running call's;
        cached batches that point at an evicted set are dropped with it)."""
        size = lambda m: sum(t.numel() * t.element_size() for t in m.values())  # noqa: E731
        total = sum(size(m) for m in self._merged.values())
        for key in [k for k in self._merged if k not in keep]:
            if total <= self.merged_budget_bytes:
                break
            total -= size(self._merged.pop(key))
            self._batches.clear()

    def _compose_layer(self, layer: str, slot_sets: list[AdapterSet]):
        """A (S, R, K) (or (S, R, C, k, k) for a k x k conv), B (S, N, R), scales (S,): A = [A1; A2], B = [s1 B1, s2 B2],
        zero-padded to the largest R, and each slot's own rank (the torch path skips the padding). Scales are
        folded into B (scales = 1)."""
        parts = [[(a.layers[layer], w * a.scale) for a, w in chosen if layer in a.layers] for chosen in slot_sets]
        if len(parts) == 1 and len(parts[0]) == 1 and parts[0][0][1] == 1.0:  # one adapter at scale 1: views, no copy
            (a, b), _ = parts[0][0]
            return a[None], b[None], torch.ones(1), (a.shape[0],)
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
        return lora_a, lora_b, torch.ones(len(parts)), tuple(ranks)

    @contextmanager
    def active(self, row_sets: list[AdapterSet]):
        """Run a UNet call with these per-row adapter sets."""
        self.context.current = self.batch(row_sets) if any(row_sets) else None
        try:
            yield
        finally:
            self.context.current = None
