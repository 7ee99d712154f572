"""gpu_unet_step: one UNet evaluation, base vs LoRA three ways (GPU suite; bench/gpu_common.py).

SD-1.5-shaped UNet, random weights, fp16, 64x64 latents, 77 text tokens, 2 rows (a CFG batch), rank-64
adapters on distillery's default targets (attention q/k/v/out and feed-forward Linears). Interleaved,
CUDA events, medians. All ratios are over `base`, the served UNet (serving layers installed) running
with no adapter, except peft's, whose base is the stock diffusers UNet (peft's own no-LoRA path):
  fused_over_base     per-row LoRA, the serving default on CUDA (fused Triton kernel), TWO different
                      adapters split across the rows (target: <= 1.05)
  merged_over_base    the same two adapters on merged weights (W0 + BA per set, made once outside the
                      timing; a GEMM per set's rows)
  peft_over_base      peft's unfused LoraLayer (diffusers load_lora_adapter) on a stock copy, one adapter
                      on every row (diffusers cannot split adapters across the rows of one call)
  fused_one_set_over_base, merged_one_set_over_base: one adapter on every row (like for like with peft)
  base_over_stock     what the serving layers cost with no adapter
The full run repeats the two-adapter figures at 8 rows (4 + 4): suffix _8rows.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bench.gpu_common import (
    base_model,
    interleaved_medians,
    plan_for,
    random_adapter,
    setup,
    stock_unet,
    with_peft_adapters,
)
from distillery.adapters import AdapterRegistry
from distillery.sampling.guidance import guidance_embedding

NEEDS_CUDA = True
CPU_SMOKE = True


def _times(plan, model, registry, stock, peft_unet, a, b, rows: int, rounds: int) -> dict[str, float]:
    unet = model.unet
    c, size = unet.config.in_channels, unet.config.sample_size
    dev = {"device": plan.device, "dtype": plan.dtype}
    x = torch.randn(rows, c, size, size, **dev)  # (rows, 4, 64, 64)
    text = torch.randn(rows, model.tokenizer.model_max_length, unet.config.cross_attention_dim, **dev)  # (rows, 77, 768)
    t = torch.full((rows,), 500, device=plan.device)
    w_emb = guidance_embedding(torch.zeros(rows)).to(**dev)  # (rows, E): no guidance adapter, zero projection
    split = [((a, 1.0),)] * (rows // 2) + [((b, 1.0),)] * (rows - rows // 2)
    one = [((a, 1.0),)] * rows
    batches = {"base": None}
    for mode, budget in (("fused", 0), ("merged", 64 << 30)):  # composed / merged once, outside the timing
        registry.merged_budget_bytes = budget
        batches[mode] = registry.backend.build_plan(split)
        batches[f"{mode}_one_set"] = registry.backend.build_plan(one)
    assert batches["merged_one_set"].merged is not None and batches["fused"].merged is None

    def served(mode):
        with torch.no_grad(), registry.backend.running(batches[mode]):
            unet(x, t, encoder_hidden_states=text, timestep_cond=w_emb)

    def plain(module):
        with torch.no_grad():
            module(x, t, encoder_hidden_states=text)

    calls = {mode: (lambda mode=mode: served(mode)) for mode in batches}
    calls |= {"stock": lambda: plain(stock), "peft": lambda: plain(peft_unet)}
    return interleaved_medians(plan, calls, rounds, warmup=2)


def run(quick: bool = False, device: str = "cuda") -> dict:
    plan = plan_for(device, quick)
    model = base_model(plan)
    stock = stock_unet(model)
    with tempfile.TemporaryDirectory() as tmp:
        folders = {name: random_adapter(plan, Path(tmp) / name, model, seed=i) for i, name in enumerate(("a", "b"))}
        peft_unet = with_peft_adapters(plan, stock, {"a": folders["a"]})
        registry = AdapterRegistry(model)
        a, b = (registry.load(name, folder) for name, folder in folders.items())
        figures = {}
        for rows in plan.pick([2, 8], [2], [2]):
            ms = _times(plan, model, registry, stock, peft_unet, a, b, rows, plan.pick(10, 3, 1))
            suffix = "" if rows == 2 else f"_{rows}rows"
            figures |= {
                f"fused_over_base{suffix}": ms["fused"] / ms["base"],
                f"merged_over_base{suffix}": ms["merged"] / ms["base"],
                f"peft_over_base{suffix}": ms["peft"] / ms["stock"],
                f"fused_one_set_over_base{suffix}": ms["fused_one_set"] / ms["base"],
                f"merged_one_set_over_base{suffix}": ms["merged_one_set"] / ms["base"],
                f"base_over_stock{suffix}": ms["base"] / ms["stock"],
                **{f"{k}_ms{suffix}": v * 1e3 for k, v in ms.items()},
            }
    return {**figures, "rank": plan.rank, "setup": setup(plan)}
