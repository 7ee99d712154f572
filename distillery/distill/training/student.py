"""Students that start from a shipped adapter: its LoRA as a peft adapter on the shared UNet (its keys
read as the server reads them, then diffusers' own `load_lora_adapter`), its w projection as a Linear.
An adapter of the unpruned base can start a student on a pruned one: the layers the pruned UNet lacks
are left out (and reported)."""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from distillery.adapters import AdapterMeta
from distillery.adapters.files import LORA_FILE, PROJECTION_FILE
from distillery.adapters.keys import peft_unet_lora
from distillery.sampling.guidance import EMBEDDING_DIM

log = logging.getLogger(__name__)


def load_adapter_into(unet, folder: Path, adapter_name: str, trainable: bool) -> tuple[AdapterMeta, nn.Linear | None]:
    """Add adapter folder `folder` to `unet` as peft adapter `adapter_name`; returns its metadata and its w
    projection (a fresh Linear holding the file's weights, not yet installed as `cond_proj`)."""
    folder = Path(folder)
    meta = AdapterMeta.read(folder)
    # diffusers writes attention layers as "lora.down/up" and others as "lora_A/B": convert all to peft keys
    # first (given the file as it is, load_lora_adapter skipped the attention layers' weights)
    lora = peft_unet_lora(load_file(str(folder / LORA_FILE)), folder)
    modules = dict(unet.named_modules())
    kept = {k: v for k, v in lora.items() if k.rsplit(".lora_", 1)[0] in modules}
    if len(kept) < len(lora):
        log.warning("%s: %d of %d LoRA tensors are for layers this UNet lacks (a pruned base); left out",
                    folder, len(lora) - len(kept), len(lora))
    unet.load_lora_adapter(kept, prefix=None, adapter_name=adapter_name)
    for name, p in unet.named_parameters():
        if f".{adapter_name}." in name and "lora_" in name:
            p.requires_grad_(trainable)
    projection = None
    if (folder / PROJECTION_FILE).exists():
        weight = load_file(str(folder / PROJECTION_FILE))["weight"]  # (C, E)
        projection = nn.Linear(EMBEDDING_DIM, weight.shape[0], bias=False).to(device=unet.device, dtype=unet.dtype)
        projection.weight.data.copy_(weight)
        projection.requires_grad_(trainable)
    return meta, projection


def start_from(unet, folder: Path, adapter_name: str, cfg) -> nn.Linear | None:
    """A trainable student initialised from adapter `folder`, its w projection (if any) installed as
    `cond_proj`; `cfg.rank` and `cfg.target_modules` become the adapter's."""
    meta, projection = load_adapter_into(unet, folder, adapter_name, trainable=True)
    if projection is not None:
        unet.time_embedding.cond_proj = projection
    cfg.rank, cfg.target_modules = meta.rank, list(meta.target_modules)
    return projection
