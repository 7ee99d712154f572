"""lora_overhead: one UNet evaluation with a LoRA set vs the base, on the CPU path.

Four configurations of the same UNet call, interleaved: base (the served UNet, no adapter),
LoRA merged (the set's merged copy of its layers: the serving default on CPU), LoRA per-row
(the torch reference of the fused kernel: DISTILLERY_MERGED_CACHE_BYTES=0, and the default on
CUDA), and stock (the same weights in an unwrapped diffusers UNet: what the
serving layers cost). 2 rows (a CFG request with a style adapter). SD15: random weights, rank
64, 64x64 latent.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from bench.common import interleaved_medians, sd15_with_adapter, toy_with_guidance_adapter
from distillery.sampling.guidance import guidance_embedding
from distillery.testing.synthetic_adapters import write_random_adapter


def _stock_copy(unet):
    """The UNet without serving layers (each wrapper replaced by the module it wraps)."""
    stock = copy.deepcopy(unet)
    for name, module in list(stock.named_modules()):
        if hasattr(module, "base") and hasattr(module, "context"):
            stock.set_submodule(name, module.base)
    stock.time_embedding.cond_proj = None
    return stock


def _ratios(model, registry, adapter, latent: int, tokens: int, rounds: int) -> dict[str, float]:
    unet = model.unet
    stock = _stock_copy(unet)
    x = torch.randn(2, unet.config.in_channels, latent, latent)
    text = torch.randn(2, tokens, unet.config.cross_attention_dim)
    t, w_emb = torch.tensor([500, 500]), guidance_embedding(torch.zeros(2))
    chosen = ((adapter, 1.0),)
    batches = {"base": None}
    for path, budget in (("unmerged", 0), ("merged", 16 << 30)):  # each composed once, outside the timing
        registry.merged_budget_bytes = budget
        batches[path] = registry.backend.build_plan([chosen, chosen])
    assert batches["merged"].merged and not batches["unmerged"].merged


    def call(path):
        with registry.backend.running(batches[path]), torch.no_grad():
            unet(x, t, encoder_hidden_states=text, timestep_cond=w_emb)

    def call_stock():
        with torch.no_grad():
            stock(x, t, encoder_hidden_states=text)

    times = interleaved_medians({**{p: (lambda p=p: call(p)) for p in batches}, "stock": call_stock}, rounds)
    return {"unmerged": times["unmerged"] / times["base"], "merged": times["merged"] / times["base"],
            "stock": times["base"] / times["stock"], "base_ms": times["base"] * 1e3}


def run(quick: bool = False) -> dict:
    model, registry, _ = toy_with_guidance_adapter()
    with tempfile.TemporaryDirectory() as tmp:
        style = registry.load("style", write_random_adapter(Path(tmp) / "style", model.unet, model.fingerprint, rank=16))
        toy = _ratios(model, registry, style, 16, model.tokenizer.model_max_length, 5 if quick else 40)
        sd_model, sd_registry, sd_style = sd15_with_adapter(Path(tmp), quick, kind="style", rank=64)
        sd = _ratios(sd_model, sd_registry, sd_style, 8 if quick else 64, 77, 1 if quick else 3)
    return {"ratio_toy": toy["merged"], "ratio_toy_per_row": toy["unmerged"],
            "ratio_sd15": sd["merged"], "ratio_sd15_per_row": sd["unmerged"],
            "base_over_stock_toy": toy["stock"], "base_over_stock_sd15": sd["stock"],
            "base_toy_ms": toy["base_ms"], "base_sd15_ms": sd["base_ms"]}
