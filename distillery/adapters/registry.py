"""The adapters served on one model: which are resident (a `Residency`), and the LoRA backend each UNet call runs on.

Making a registry installs the serving layers into the model's UNet (an explicit step: the engine's
start, a benchmark's set-up), once per model copy; the compiled UNet's slot layers, if given, sit on a module
tree of their own sharing its weights. Which backend runs a call: backends/choice.py (`choose` measures).
Threads: the residency's rules (residency.py): loads, lookups and listings on any thread, disk reads
outside its lock. Backends make and use their caches on the torch thread only; an adapter leaving tells
them to forget theirs, which they drop there.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Callable

from distillery.adapters.backends import (
    Choice,
    LoRABackend,
    Routed,
    SlotAdapters,
    available_backends,
    default_choice,
    default_merged_budget,
    forced_choice,
    measure,
    timing_calls,
)
from distillery.adapters.backends.choice import log_table
from distillery.adapters.loaded import AdapterSet, LoadedAdapter, read_loaded
from distillery.adapters.residency import AdapterEntry, Residency
from distillery.model import DiffusionModel


class AdapterRegistry:
    def __init__(self, model: DiffusionModel, budget_bytes: int | None = None, merged_budget_bytes: int | None = None,
                 slots: SlotAdapters | None = None, check: Callable[[LoadedAdapter], None] | None = None):
        """`budget_bytes`: resident adapters' bytes (None: no limit). `merged_budget_bytes`: the merged backend's
        cache of merged weights (W0 + BA; the running call's sets always stay); None: the device's default;
        unmeasured, > 0 also chooses merged over per-row. `slots` (the compiled UNet's): a third backend.
        `check(adapter)`: what the caller requires of every adapter read (the server: that the sampling plan
        accepts its own sampling); AdapterError refuses it."""
        self.model, self.slots = model, slots
        self.backends = available_backends(model, slots)  # raises if another registry serves this UNet
        self.residency = Residency(partial(_read_checked, model, check), budget_bytes, on_leave=self.forget_cached)
        self.measured: Choice | None = None  # `choose`'s, once called
        self.merged_budget_bytes = (default_merged_budget(model.device) if merged_budget_bytes is None
                                    else merged_budget_bytes)

    @property
    def choice(self) -> Choice:
        """The backend per kind of call: measured (`choose`), else the fixed rule."""
        return self.measured or default_choice(self.backends, self.merged_budget_bytes)

    @property
    def backend(self) -> LoRABackend:
        """What the next UNet call runs on (`pipeline._unet_call` asks `registry.backend.eps(...)`): the chosen
        backend, or one routing each call to its kind's when one-set and mixed calls chose differently."""
        choice = self.choice
        return self.backends[choice.one_set] if choice.one_set == choice.mixed else Routed(self.backends, choice)

    def choose(self, forced: str, inputs: tuple) -> Choice:
        """Choose the backends for the calls to come: `forced` ("auto": measured on `inputs`, (x, t, cond, w_emb) of
        one UNet call of the configured batch, with the resident adapters or random ones of their shapes)."""
        started = time.perf_counter()
        if forced != "auto":
            self.measured = forced_choice(self.backends, forced)
        else:
            calls = timing_calls(self.model, list(self.residency.resident.values()), inputs[0].shape[0])
            try:
                self.measured = measure(self.backends, inputs, calls,
                                        prefer=default_choice(self.backends, self.merged_budget_bytes).one_set)
            finally:
                self.forget_cached()  # the timing sets' plans and merged weights (random adapters among them)
                if self.slots is not None:
                    for name in [n for n in self.slots.loaded if n.startswith("~timing-")]:
                        self.slots.unload(name)
        log_table(self.measured, inputs[0].shape[0], (time.perf_counter() - started) * 1e3)
        return self.measured

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
