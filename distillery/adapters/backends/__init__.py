"""The LoRA backends behind one interface (base.py), which of them a model can run, and the rule choosing one.

Backend selection lives here and nowhere else: the registry asks `select_backend` before each UNet call.
"""

from __future__ import annotations

from distillery.adapters.backends.base import LoRABackend
from distillery.adapters.backends.compiled import SlotAdapters
from distillery.adapters.backends.merged import MergedBackend, default_merged_budget
from distillery.adapters.backends.per_row import PerRowBackend
from distillery.adapters.layers import install_serving_layers


def available_backends(model, slots: SlotAdapters | None = None,
                       merged_budget_bytes: int = 0) -> dict[str, LoRABackend]:
    """Every backend the model's UNet can run, by name: the compiled one alone when its slot layers are
    installed (`slots`); else per-row and merged, on eager serving layers installed here (once per UNet:
    raises if another registry serves it) and shared by both."""
    if slots is not None:
        return {slots.name: slots}
    context = install_serving_layers(model.unet)
    backends = (PerRowBackend(model, context), MergedBackend(model, context, merged_budget_bytes))
    return {backend.name: backend for backend in backends}


def select_backend(backends: dict[str, LoRABackend], merged_budget_bytes: int) -> LoRABackend:
    """The compiled UNet when installed; else merged weights when they have a budget, else per-row LoRA."""
    if "compiled" in backends:
        return backends["compiled"]
    return backends["merged" if merged_budget_bytes > 0 else "per_row"]


__all__ = ["LoRABackend", "MergedBackend", "PerRowBackend", "SlotAdapters", "available_backends",
           "default_merged_budget", "select_backend"]
