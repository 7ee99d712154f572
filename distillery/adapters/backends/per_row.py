"""The per-row backend: each row of a UNet call gets its own adapter set's LoRA over the shared W0.

A call's distinct sets get set indices; each layer's sets are composed by rank concatenation
(composition.py) and run through `kernels.lora_linear` (Triton on CUDA, torch elsewhere) in the eager
serving layers (layers.py). Switching the adapters a call uses builds a `CallPlan` of views and small
concatenations, cached by row pattern: nothing is reloaded and W0 is never copied.
"""

from __future__ import annotations

from cachetools import LRUCache

from distillery.adapters.composition import Compositions
from distillery.adapters.layers import CallPlan, LoRAContext
from distillery.adapters.loaded import AdapterSet, set_key
from distillery.kernels import RowMapping, Workspace

MAX_CACHED_PLANS = 64  # row patterns (steady batches and switches back cost a lookup)


def index_sets(row_sets: list[AdapterSet]) -> tuple[list[AdapterSet], list[int]]:
    """The call's distinct non-empty sets in order of first appearance, and each row's set index (-1: none)."""
    index: dict[tuple, int] = {}
    call_sets: list[AdapterSet] = []
    set_of_row = []
    for chosen in row_sets:
        if not chosen:
            set_of_row.append(-1)
            continue
        key = set_key(chosen)
        if key not in index:
            index[key] = len(call_sets)
            call_sets.append(chosen)
        set_of_row.append(index[key])
    return call_sets, set_of_row


def touched_layers(call_sets: list[AdapterSet]) -> set[str]:
    return {layer for chosen in call_sets for a, _ in chosen for layer in a.layers}


class PerRowBackend:
    """Plans for the eager serving layers installed with `context` (layers.install_serving_layers); another
    backend on the same layers is cheap: it shares the context and keeps caches of its own."""

    name = "per_row"

    def __init__(self, model, context: LoRAContext):
        self.unet, self.device, self.context = model.unet, model.device, context
        self.workspace = Workspace()  # the Triton shrink's buffer, shared by every call: they run one at a time
        self.compositions = Compositions()
        self._plans: LRUCache[tuple, CallPlan] = LRUCache(MAX_CACHED_PLANS)  # by row pattern
        self._generation = self._seen = 0  # `forget` bumps it (any thread); the torch thread clears on seeing it

    def forget(self) -> None:
        self._generation += 1

    def clear(self) -> None:
        """Every cache, now (on the torch thread)."""
        self._plans.clear()
        self.compositions.clear()

    def plan(self, row_sets: list[AdapterSet]) -> CallPlan:
        """The call's plan (cached by row pattern). On the torch thread."""
        if self._seen != self._generation:
            self._seen = self._generation
            self.clear()
        pattern = tuple(set_key(chosen) for chosen in row_sets)
        plan = self._plans.get(pattern)
        if plan is None:
            plan = self._plans[pattern] = self.build_plan(row_sets)
        return plan

    def build_plan(self, row_sets: list[AdapterSet]) -> CallPlan:
        """A set index per distinct non-empty set, its w projection, and the weights its layers run on."""
        call_sets, set_of_row = index_sets(row_sets)
        plan = CallPlan(RowMapping.of(set_of_row, self.device, self.workspace))  # once per row pattern
        # the w projection of the set's w-conditioned adapter (the plan allows one per set), if it has one
        plan.projections = [next((a.projection for a, _ in chosen if a.projection is not None), None)
                            for chosen in call_sets]
        self.add_weights(plan, call_sets, set_of_row)
        return plan

    def add_weights(self, plan: CallPlan, call_sets: list[AdapterSet], set_of_row: list[int]) -> None:
        """Per-row LoRA on every layer the sets touch."""
        plan.layers = self.compositions.of(call_sets, touched_layers(call_sets))

    def running(self, plan: CallPlan | None):
        """`with backend.running(plan): unet(...)` with a plan made beforehand (benchmarks time the UNet alone)."""
        return self.context.running(plan)

    def active(self, row_sets: list[AdapterSet]):
        """`with backend.active(row_sets): unet(...)`, for callers that call the UNet themselves."""
        return self.running(self.plan(row_sets) if any(row_sets) else None)

    def eps(self, x, t, cond, w_emb, row_sets: list[AdapterSet]):
        with self.active(row_sets):
            return self.unet(x, t, **cond.unet_kwargs(), timestep_cond=w_emb).sample  # (rows, C, h, w)
