"""Adapters with random weights in the real file format, for benchmarks and tests.

Shapes, file layout and metadata are exactly what the distillers write; only the values are
random (a style LoRA or a w-conditioned adapter at any rank on any base, without training one).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from distillery.adapters import LORA_FILE, META_FILE, PROJECTION_FILE, W_CONDITIONED, AdapterMeta
from distillery.distill.methods.consistency import ConsistencyDistillConfig, sampling_recipe
from distillery.distill.methods.guidance import DEFAULT_TARGETS
from distillery.sampling.guidance import EMBEDDING_DIM


def write_random_adapter(folder: Path, unet, base_fingerprint: str, kind: str = "style", rank: int = 4,
                         targets: list[str] = DEFAULT_TARGETS, std: float = 0.05, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, module in unet.named_modules():
        module = getattr(module, "base", module)  # a layer already wrapped for serving keeps its own as .base
        if not any(name.endswith(t) for t in targets) or not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        out_features, *in_shape = module.weight.shape  # peft's layouts: A (r, K) or a conv (r, C, k, k)
        up_shape = (out_features, rank) if isinstance(module, nn.Linear) else (out_features, rank, 1, 1)
        lora[f"unet.{name}.lora.down.weight"] = torch.randn(rank, *in_shape, generator=g) * std
        lora[f"unet.{name}.lora.up.weight"] = torch.randn(*up_shape, generator=g) * std
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(lora, str(folder / LORA_FILE))
    recipe = sampling_recipe(ConsistencyDistillConfig(num_ddim_timesteps=20)) if kind == "consistency" else {}
    meta = AdapterMeta(kind=kind, base_fingerprint=base_fingerprint, rank=rank, alpha=float(rank),
                       target_modules=list(targets), training={"synthetic": True, "seed": seed}, **recipe)
    if kind in W_CONDITIONED:
        meta.w_max, meta.embedding_dim = 5.0, EMBEDDING_DIM
        proj = torch.randn(unet.time_embedding.linear_1.in_features, EMBEDDING_DIM, generator=g) * std
        save_file({"weight": proj}, str(folder / PROJECTION_FILE))
    (folder / META_FILE).write_text(json.dumps(asdict(meta), indent=1))
    return folder
