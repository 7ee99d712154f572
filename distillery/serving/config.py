"""Serving configuration: one Settings object, environment prefix DISTILLERY_."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_MODEL

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
    # 0: adapters run as per-row LoRA (the fused kernel on CUDA); > 0: every adapter set runs on its own
    # merged copy of the layers it touches (W0 + BA: faster, more memory), this many bytes kept cached.
    # Unset: 2 GiB on CPU, 0 on CUDA (distillery/adapters/registry.py: default_merged_budget)
    merged_cache_bytes: int | None = None
    api_key: str | None = None  # POST/DELETE /adapters need it in X-API-Key; unset: those routes answer 403
    request_timeout_s: float = 120.0  # a request not answered by then gets 503 with Retry-After
    max_steps: int | None = None  # operator's cap on steps per request; unset: what the scheduler allows
    exit_on_worker_death: bool = True  # the engine's worker died: stop the process so the orchestrator restarts it
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    # off: the eager serving layers. inductor: torch.compile of a UNet whose adapters sit in fixed slots
    # (distillery/adapters/slots.py: no recompilation across adapters, w and batch sizes up to 16 rows; every
    # bucket is compiled at start, other image sizes at first use). eager: the same graphs without code
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
                adapter, _, weight = ref.partition(":")
                try:
                    ok = bool(adapter) and 0.0 <= float(weight or 1.0) <= 2.0
                except ValueError:
                    ok = False
                if not ok:
                    raise ValueError(f"preset {name!r}: {ref!r} is not 'adapter' or 'adapter:weight' with weight "
                                     f"in [0, 2]")
        return presets


    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float16 if self.device.startswith("cuda") else torch.float32
        return getattr(torch, self.dtype)


@lru_cache
def get_settings() -> Settings:
    return Settings()
