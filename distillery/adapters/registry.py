"""The adapters served on one model: which are resident (a `Residency`), and the LoRA backend each UNet call runs on.

Making a registry installs the serving layers into the model's UNet (an explicit step: the engine's
start, a benchmark's set-up), once per model copy, unless the compiled UNet's slot layers are given.
Threads: the residency's rules (residency.py): loads, lookups and listings on any thread, disk reads
outside its lock. Backends make and use their caches on the torch thread only; an adapter leaving tells
them to forget theirs, which they drop there.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

from distillery.adapters.backends import (
    LoRABackend,
    SlotAdapters,
    available_backends,
    default_merged_budget,
    select_backend,
)
from distillery.adapters.loaded import AdapterSet, LoadedAdapter, read_loaded
from distillery.adapters.residency import AdapterEntry, Residency
from distillery.model import DiffusionModel


class AdapterRegistry:
    def __init__(self, model: DiffusionModel, budget_bytes: int | None = None, merged_budget_bytes: int | None = None,
                 slots: SlotAdapters | None = None, check: Callable[[LoadedAdapter], None] | None = None):
        """`budget_bytes`: resident adapters' bytes (None: no limit). `merged_budget_bytes` > 0: a call's adapter
        sets run on merged weights (W0 + BA, cached up to this many bytes; the running call's sets always stay);
        0: per-row LoRA. None: the device's default. `slots` (installed into the model's UNet already): UNet
        calls run through them (the compiled UNet) instead. `check(adapter)`: what the caller requires of every
        adapter read (the server: that the sampling plan accepts its own sampling); AdapterError refuses it."""
        self.model, self.slots = model, slots
        self.backends = available_backends(model, slots)  # raises if another registry serves this UNet
        self.residency = Residency(partial(_read_checked, model, check), budget_bytes, on_leave=self.forget_cached)
        self.merged_budget_bytes = (default_merged_budget(model.device) if merged_budget_bytes is None
                                    else merged_budget_bytes)

    @property
    def backend(self) -> LoRABackend:
        """What the next UNet call runs on: `pipeline._unet_call` asks `registry.backend.eps(...)`."""
        return select_backend(self.backends, self.merged_budget_bytes)

    @property
    def merged_budget_bytes(self) -> int:
        return self._merged_budget_bytes

    @merged_budget_bytes.setter
    def merged_budget_bytes(self, value: int) -> None:
        self._merged_budget_bytes = value
        if "merged" in self.backends:
            self.backends["merged"].budget_bytes = value
        self.forget_cached()  # cached plans were made under the old budget

    def forget_cached(self) -> None:
        """Cached plans and merged weights name adapters: they go when any adapter leaves (dropped on the
        torch thread, at each backend's next call)."""
        for backend in self.backends.values():
            backend.forget()

    def active(self, row_sets: list[AdapterSet]):
        """`with registry.active(row_sets): unet(...)` for callers that call the UNet themselves (tests,
        benchmarks); eager backends only (the compiled UNet pads rows and runs its own graph: use `eps`)."""
        return self.backend.active(row_sets)

    # The residency's surface, for the engine and the routes
    def load(self, name: str, folder: str | Path) -> LoadedAdapter:
        return self.residency.load(name, folder)

    def unload(self, name: str) -> None:
        self.residency.unload(name)

    def get(self, name: str) -> LoadedAdapter:
        return self.residency.get(name)

    def resident_or_none(self, name: str) -> LoadedAdapter | None:
        return self.residency.resident_or_none(name)

    def acquire(self, chosen: AdapterSet) -> None:
        self.residency.acquire(chosen)

    def release(self, chosen: AdapterSet) -> None:
        self.residency.release(chosen)

    def figures(self) -> dict[str, int]:
        return self.residency.figures()

    def entries(self) -> list[AdapterEntry]:
        """(name, path, adapter or None if evicted, requests using it) per registered adapter, by name."""
        return self.residency.entries()

    @property
    def budget_bytes(self) -> int | None:
        return self.residency.budget_bytes

    @budget_bytes.setter
    def budget_bytes(self, value: int | None) -> None:
        self.residency.budget_bytes = value

    @property
    def resident_bytes(self) -> int:
        return self.residency.resident_bytes

    @property
    def known(self) -> dict[str, Path]:
        return self.residency.known

    @property
    def resident(self):  # OrderedDict name -> LoadedAdapter, least recently used first
        return self.residency.resident

    @property
    def in_use(self):  # Counter name -> requests
        return self.residency.in_use

    @property
    def loads(self) -> int:
        return self.residency.loads

    @property
    def evictions(self) -> int:
        return self.residency.evictions


def _read_checked(model: DiffusionModel, check, name: str, folder: Path) -> LoadedAdapter:
    adapter = read_loaded(name, folder, model)
    if check is not None:
        check(adapter)
    return adapter
