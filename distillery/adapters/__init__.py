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
                                       read_adapter,
                                       save_adapter,
)
from distillery.adapters.loaded import (
                                       AdapterSet,
                                       GuidanceOutOfRange,
                                       LoadedAdapter,
                                       UnsupportedSampling,
                                       check_guidance,
                                       default_scheduler,
                                       guidance_adapter,
                                       sampling_for,
                                       set_key,
)
from distillery.adapters.backends import LoRABackend, SlotAdapters, default_merged_budget
from distillery.adapters.registry import AdapterRegistry
from distillery.adapters.residency import AdapterEntry, AdapterInUse, UnknownAdapter

__all__ = ["KINDS", "LORA_FILE", "META_FILE", "PROJECTION_FILE", "STEP_DISTILLED", "W_CONDITIONED", "AdapterEntry",
           "AdapterError", "AdapterInUse", "AdapterMeta", "AdapterRegistry", "AdapterSet", "GuidanceOutOfRange",
           "LoRABackend", "LoadedAdapter", "SlotAdapters", "UnknownAdapter", "UnsupportedSampling", "check_guidance",
           "default_merged_budget", "default_scheduler", "guidance_adapter", "read_adapter", "sampling_for",
           "save_adapter", "set_key"]
