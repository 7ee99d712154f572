"""The adapters served on one model: residency, and per UNet call the slots its rows use.

Making a registry installs the serving layers into the model's UNet (an explicit step: the
engine's start, a benchmark's set-up), once per model copy; the layers read the running batch
from the registry's `LoRAContext`, which they were given at install. Switching the adapters a
batch uses builds an `AdapterBatch` of views and small concatenations (cached by row pattern):
nothing is reloaded and W0 is never copied. Compositions and merged weights are made and used
on the torch thread only; an adapter leaving bumps a generation that drops them there.
"""

from __future__ import annotations

from collections import OrderedDict

from distillery.adapters.composition import Compositions
from distillery.adapters.layers import AdapterBatch, LoRAContext, ServingLinear, install_serving_layers
from distillery.adapters.loaded import AdapterSet, guidance_adapter, read_loaded, set_key
from distillery.adapters.merged import MergedWeights, default_merged_budget
from distillery.adapters.residency import Residency
from distillery.adapters.slots import SlotAdapters
from distillery.kernels import RowSlots, Workspace, segments_of
from distillery.model import DiffusionModel

MAX_CACHED_BATCHES = 64  # row patterns (steady batches and switches back cost a lookup)


class AdapterRegistry(Residency):
    def __init__(self, model: DiffusionModel, budget_bytes: int | None = None, merged_budget_bytes: int | None = None,
                 slots: SlotAdapters | None = None):
        """`merged_budget_bytes` > 0: a call's adapter sets run on merged weights (W0 + BA, cached up to this many
        bytes; the running call's sets always stay); 0: per-row LoRA. None: the device's default. `slots`
        (installed into the model's UNet already): UNet calls run through them (the compiled UNet) instead."""
        self.context, self.slots = LoRAContext(), slots
        if slots is None:
            install_serving_layers(model.unet, self.context)  # raises if another registry serves this UNet
        super().__init__(lambda name, folder: read_loaded(name, folder, model), budget_bytes,
                         on_leave=self.forget_cached)
        self.model = model
        self._generation = self._cache_generation = 0  # bumped when an adapter leaves: cached slots go
        self._batches: OrderedDict[tuple, AdapterBatch] = OrderedDict()  # per-call slots, by row pattern
        self._compositions = Compositions()
        self._workspace = Workspace()  # the Triton shrink's buffer, shared by every call: they run one at a time
        self._merged = MergedWeights(model.unet, 0)
        self.merged_budget_bytes = default_merged_budget(model.device) if merged_budget_bytes is None else merged_budget_bytes

    @property
    def merged_budget_bytes(self) -> int:
        return self._merged.budget_bytes

    @merged_budget_bytes.setter
    def merged_budget_bytes(self, value: int) -> None:
        self._merged.budget_bytes = value
        self.forget_cached()  # cached slots were composed under the old budget

    def forget_cached(self) -> None:
        """Cached slots and merged weights name adapters: they go when any adapter leaves (dropped on the
        torch thread, at its next `batch`)."""
        self._generation += 1

    def batch(self, row_sets: list[AdapterSet]) -> AdapterBatch:
        """Slots for one UNet call (cached by row pattern). On the torch thread."""
        if self._cache_generation != self._generation:
            self._cache_generation = self._generation
            self._batches.clear()
            self._compositions.clear()
            self._merged.clear()
        pattern = tuple(set_key(chosen) for chosen in row_sets)
        batch = self._batches.get(pattern)
        if batch is None:
            batch = self._batches[pattern] = self.build_batch(row_sets)
            while len(self._batches) > MAX_CACHED_BATCHES:
                self._batches.popitem(last=False)
        self._batches.move_to_end(pattern)
        return batch

    def build_batch(self, row_sets: list[AdapterSet]) -> AdapterBatch:
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
        batch = AdapterBatch(RowSlots.of(row_slot, self.model.device, self._workspace))  # once per row pattern
        batch.projections = [(d.projection if (d := guidance_adapter(chosen)) else None) for chosen in slot_sets]
        touched = {layer for chosen in slot_sets for a, _ in chosen for layer in a.layers}
        if self.merged_budget_bytes > 0:
            merged = [self._merged.of(chosen) for chosen in slot_sets]
            if self._merged.trim(keep={set_key(chosen) for chosen in slot_sets}):
                self._batches.clear()  # they may hold an evicted set's weights
            if len(slot_sets) == 1 and -1 not in row_slot:
                batch.merged = merged[0]
                return batch
            batch.slot_merged, batch.all_segments = merged, segments_of(row_slot, with_base=True)
            touched = {layer for layer in touched if not isinstance(self.model.unet.get_submodule(layer), ServingLinear)}
        batch.layers = self._compositions.of(slot_sets, touched)
        return batch

    def active(self, row_sets: list[AdapterSet]):
        """Run a UNet call with these per-row adapter sets: `with registry.active(row_sets): unet(...)`."""
        return self.context.running(self.batch(row_sets) if any(row_sets) else None)
