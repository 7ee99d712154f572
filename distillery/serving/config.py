"""Serving configuration: one Settings object, environment prefix DISTILLERY_."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from distillery.adapters.backends import NAMES as LORA_BACKENDS
from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_MODEL
from distillery.sampling.plan import DEFAULT_MAX_COST, DEFAULT_MAX_STEPS, WEIGHT_RANGE

API_KEY_ENV = "DISTILLERY_API_KEY"  # the admin routes' key (Settings.api_key)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILLERY_")

    model_path: str = str(EMBEDDED_MODEL)  # a diffusers folder (or a hub id on a connected host)
    adapters_root: str = str(EMBEDDED_ADAPTERS)  # every folder here with an adapter.json is loaded at start
    device: str = "cpu"
    # auto: float16 on CUDA (half the memory, tensor-core speed), float32 on CPU (CPUs have no fast fp16 convs)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    queue_size: int = 16  # requests waiting beyond this get 429
    # A UNet call holds at most this many rows' worth of latent pixels, counted at the model's native
    # size (a CFG request takes 2 rows, a single-eval one 1; a row at twice the size counts 4).
    max_batch_rows: int = 12
    # Throughput mode (False, the default): the fastest batched kernels on each device; an image can
    # differ in its last bits with what shares its batch. Deterministic mode (True): every image row is
    # its own UNet call, so the same request and seed give the same PNG bytes whatever else is in flight.
    deterministic: bool = False
    adapter_budget_bytes: int | None = None  # resident adapter bytes; least recently used evicted beyond it
    # The merged backend's cache: adapter sets' merged copies of the layers they touch (W0 + BA), this many bytes
    # kept (the running call's always). Unset: 2 GiB on CPU, 0 on CUDA (backends/merged.py: default_merged_budget)
    merged_cache_bytes: int | None = None
    # Which LoRA backend runs a UNet call: auto times each available one at start-up (one-set and mixed calls
    # apart; distillery/adapters/backends/choice.py); per_row, merged or compiled (needs `compile`) forces one.
    # Not DISTILLERY_LORA_BACKEND: that is the kernels' own triton/torch switch inside per-row LoRA.
    adapter_backend: Literal[("auto", *LORA_BACKENDS)] = "auto"
    api_key: str | None = None  # POST/DELETE /adapters need it in X-API-Key; unset: those routes answer 403
    request_timeout_s: float = 120.0  # a request not answered by then gets 503 with Retry-After
    # SIGTERM: new requests get 503 while those in flight may finish for this long; then the process exits
    graceful_shutdown_s: float = Field(default=125.0, ge=0)
    max_body_bytes: int = Field(default=1 << 20, ge=1024)  # larger request bodies: 413, before anything parses them
    # Work per request: steps per image (None: what the scheduler allows), and a request's UNet row-steps at the
    # native size, all its images together (a 25-step CFG image at the native size costs 50; None: no cap)
    max_steps: int | None = Field(default=DEFAULT_MAX_STEPS, ge=1)
    max_request_cost: float | None = Field(default=DEFAULT_MAX_COST, gt=0)
    exit_on_worker_death: bool = True  # the engine's worker died: stop the process so the orchestrator restarts it
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    # off: the eager serving layers. inductor: torch.compile of a UNet whose adapters sit in fixed slots
    # (distillery/adapters/slots.py: no recompilation across adapters, w and batch sizes; every bucket is
    # compiled at start at the native size, other image sizes on a thread of their own at first use, running
    # eagerly meanwhile; more rows than the largest bucket run as several calls). eager: the same graphs without code
    # generation (tests). Slots: adapters one UNet call can hold; rank: the largest adapter rank they take.
    compile: Literal["off", "inductor", "eager"] = "off"
    compile_slots: int = Field(default=4, ge=1, le=64)
    compile_rank: int = Field(default=16, ge=1, le=1024)
    # The OpenAI API's models beyond the base and one per adapter: {"id": ["adapter", "adapter:weight", ...]},
    # e.g. DISTILLERY_PRESETS='{"fast-stripes": ["lcm-toy", "stripes-toy:0.8"]}'
    presets: dict[str, list[str]] = {}

    @field_validator("presets")
    @classmethod
    def _adapter_refs(cls, presets: dict[str, list[str]]) -> dict[str, list[str]]:
        """Each "adapter" or "adapter:weight" readable at start, not a 500 at the first request."""
        for name, refs in presets.items():
            for ref in refs:
                try:
                    adapter_ref(ref)
                except ValueError as exc:
                    raise ValueError(f"preset {name!r}: {exc}") from None
        return presets

    @model_validator(mode="after")
    def _compiled_needs_compile(self) -> Settings:
        if self.adapter_backend == "compiled" and self.compile == "off":
            raise ValueError("adapter_backend: 'compiled' needs DISTILLERY_COMPILE=inductor or eager (allowed with "
                             "compile off: auto, per_row or merged)")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float16 if self.device.startswith("cuda") else torch.float32
        return getattr(torch, self.dtype)


def adapter_ref(ref: str) -> tuple[str, float]:
    """A preset's "adapter" or "adapter:weight" as (name, weight); ValueError naming what is allowed."""
    adapter, _, weight = ref.partition(":")
    try:
        value = float(weight or 1.0)
    except ValueError:
        value = float("nan")
    if not adapter or not WEIGHT_RANGE[0] <= value <= WEIGHT_RANGE[1]:
        raise ValueError(f"{ref!r} is not 'adapter' or 'adapter:weight' with weight in [{WEIGHT_RANGE[0]:g}, "
                         f"{WEIGHT_RANGE[1]:g}]")
    return adapter, value


@lru_cache
def get_settings() -> Settings:
    return Settings()
