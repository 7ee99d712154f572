"""Adapters over the one frozen base: the file format, LoRA keys, residency, composition, the LoRA backends."""

from distillery.adapters.files import (
                                       KINDS,
                                       LORA_FILE,
                                       META_FILE,
                                       PROJECTION_FILE,
                                       STEP_DISTILLED,
                                       W_CONDITIONED,
                                       AdapterError,
                                       AdapterMeta,
                                       OtherBase,
                                       read_adapter,
                                       save_adapter,
)
from distillery.adapters.loaded import AdapterSet, LoadedAdapter, set_key
from distillery.adapters.backends import LoRABackend, SlotAdapters, default_merged_budget
from distillery.adapters.registry import AdapterRegistry
from distillery.adapters.residency import AdapterEntry, AdapterInUse, UnknownAdapter

__all__ = ["KINDS", "LORA_FILE", "META_FILE", "PROJECTION_FILE", "STEP_DISTILLED", "W_CONDITIONED", "AdapterEntry",
           "AdapterError", "AdapterInUse", "AdapterMeta", "AdapterRegistry", "AdapterSet", "LoRABackend",
           "LoadedAdapter", "OtherBase", "SlotAdapters", "UnknownAdapter", "default_merged_budget", "read_adapter",
           "save_adapter", "set_key"]
