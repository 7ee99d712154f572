"""gpu_adapter_switch: making the next UNet call use another adapter set, distillery vs peft/diffusers
(GPU suite; bench/gpu_common.py). Two resident rank-64 adapters on the SD-1.5-shaped UNet, fp16, 2 rows.

distillery (AdapterRegistry): a switch is the next call's row pattern.
  switch_ms               a new row pattern, composed from nothing (the registry's caches dropped first):
                          views of one adapter's owned tensors, per layer
  switch_composed_ms      the same for a composed set (a at 1.0 + b at 0.7: rank-concatenated copies with
                          the weights folded in)
  switch_cached_ms        a pattern seen before (a cached lookup: the steady state of a server)
peft/diffusers: both adapters loaded as peft adapters in a stock copy, switched by `set_adapters`:
  set_adapters_ms         ["a"] <-> ["b"];  set_adapters_composed_ms: ["a", "b"] at [1.0, 0.7] <-> ["b"]
  switch_over_set_adapters, switch_composed_over_set_adapters: distillery's new-pattern switch over peft's.
Wall clock with the device synchronized after each switch (its GPU work, if any, counts); medians,
distillery and peft interleaved. unet_call_ms: one served 2-row UNet call with an adapter, for scale.
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
ROWS = 2


def run(quick: bool = False, device: str = "cuda") -> dict:
    plan = plan_for(device, quick)
    model = base_model(plan)
    stock = stock_unet(model)
    with tempfile.TemporaryDirectory() as tmp:
        folders = {name: random_adapter(plan, Path(tmp) / name, model, seed=i) for i, name in enumerate(("a", "b"))}
        peft_unet = with_peft_adapters(plan, stock, folders)
        del stock
        registry = AdapterRegistry(model)
        a, b = (registry.load(name, folder) for name, folder in folders.items())
    set_a, set_b, set_ab = ((a, 1.0),), ((b, 1.0),), ((a, 1.0), (b, 0.7))

    def alternate(first, second):
        flip = [False]

        def step():  # a switch every call: first, second, first, ...
            flip[0] = not flip[0]
            return first() if flip[0] else second()
        return step

    def ours(chosen, fresh: bool):
        def switch():
            if fresh:
                registry.forget_cached()
            with registry.active([chosen] * ROWS):
                pass
        return switch

    def theirs(names, weights):
        return lambda: peft_unet.set_adapters(names, weights)

    rounds = plan.pick(100, 20, 4)
    times = interleaved_medians(plan, {
        "switch": alternate(ours(set_a, True), ours(set_b, True)),
        "switch_composed": alternate(ours(set_ab, True), ours(set_b, True)),
        "set_adapters": alternate(theirs(["a"], [1.0]), theirs(["b"], [1.0])),
        "set_adapters_composed": alternate(theirs(["a", "b"], [1.0, 0.7]), theirs(["b"], [1.0])),
    }, rounds, warmup=2, events=False)
    # alone: the fresh switches above drop the registry's caches, which is what this one must keep
    times |= interleaved_medians(plan, {"switch_cached": alternate(ours(set_a, False), ours(set_b, False))},
                                 rounds, warmup=2, events=False)
    ms = {k: v * 1e3 for k, v in times.items()}

    unet, dev = model.unet, {"device": plan.device, "dtype": plan.dtype}
    size = unet.config.sample_size
    x = torch.randn(ROWS, unet.config.in_channels, size, size, **dev)
    text = torch.randn(ROWS, model.tokenizer.model_max_length, unet.config.cross_attention_dim, **dev)
    t, w_emb = torch.full((ROWS,), 500, device=plan.device), guidance_embedding(torch.zeros(ROWS)).to(**dev)

    def call():
        with torch.no_grad(), registry.active([set_a] * ROWS):
            unet(x, t, encoder_hidden_states=text, timestep_cond=w_emb)

    unet_call = interleaved_medians(plan, {"call": call}, plan.pick(10, 2, 1))["call"] * 1e3
    return {
        "switch_over_set_adapters": ms["switch"] / ms["set_adapters"],
        "switch_composed_over_set_adapters": ms["switch_composed"] / ms["set_adapters_composed"],
        **{f"{k}_ms": v for k, v in ms.items()},
        "unet_call_ms": unet_call, "rank": plan.rank, "setup": setup(plan),
    }
