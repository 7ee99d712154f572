"""Serving configuration: one Settings object, environment prefix DISTILLERY_."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_MODEL = Path(__file__).resolve().parent.parent / "models" / "toy"
EMBEDDED_ADAPTERS = EMBEDDED_MODEL.parent / "adapters"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILLERY_")

    model_path: str = str(EMBEDDED_MODEL)  # a diffusers folder (or a hub id on a connected host)
    adapters_root: str = str(EMBEDDED_ADAPTERS)  # every folder here with an adapter.json is loaded at start
    device: str = "cpu"
    dtype: str = "float32"
    queue_size: int = 16  # requests waiting beyond this get 429
    max_batch_rows: int = 16  # UNet rows per batched step (a CFG request takes 2, a single-eval one 1)
    adapter_budget_bytes: int | None = None  # resident adapter bytes; least recently used evicted beyond it
    # 0: adapters run as per-row LoRA (the fused kernel on CUDA); > 0: every adapter set runs on its own
    # merged copy of the layers it touches (W0 + BA: faster, more memory), this many bytes kept cached.
    # Unset: 2 GiB on CPU, 0 on CUDA (server/registry.py: default_merged_budget)
    merged_cache_bytes: int | None = None
    api_key: str | None = None  # when set, POST/DELETE /adapters need it in X-API-Key
    request_timeout_s: float = 120.0
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default


@lru_cache
def get_settings() -> Settings:
    return Settings()
