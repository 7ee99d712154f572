"""The LoRA backends behind one interface (base.py), which of them a model can run, and which one runs a call.

Backend choice lives in choice.py and nowhere else: measured at start-up (or the fixed rule, unmeasured), asked
by the registry for each UNet call.
"""

from __future__ import annotations

from distillery.adapters.backends.base import LoRABackend
from distillery.adapters.backends.choice import (CASES, NAMES, Choice, Routed, default_choice, forced_choice, measure,
                                                 timing_calls)
from distillery.adapters.backends.compiled import SlotAdapters
from distillery.adapters.backends.merged import MergedBackend, default_merged_budget
from distillery.adapters.backends.per_row import PerRowBackend
from distillery.adapters.layers import install_serving_layers


def available_backends(model, slots: SlotAdapters | None = None,
                       merged_budget_bytes: int = 0) -> dict[str, LoRABackend]:
    """Every backend the model can run, by name: per-row and merged on eager serving layers installed here into
    the model's UNet (once per UNet: raises if another registry serves it) and shared by both; and the compiled
    one when its slot layers are given (`slots`: on a module tree of their own, sharing the weights). Calls the
    slots cannot hold (an adapter of a higher rank, too many adapters in one row's set) run per-row."""
    context = install_serving_layers(model.unet)
    backends = [PerRowBackend(model, context), MergedBackend(model, context, merged_budget_bytes)]
    if slots is not None:
        slots.fallback = backends[0]
        backends.append(slots)
    return {backend.name: backend for backend in backends}


__all__ = ["CASES", "NAMES", "Choice", "LoRABackend", "MergedBackend", "PerRowBackend", "Routed", "SlotAdapters",
           "available_backends", "default_choice", "default_merged_budget", "forced_choice", "measure",
           "timing_calls"]
