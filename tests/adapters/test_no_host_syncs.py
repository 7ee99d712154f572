"""No host syncs inside a served UNet call: everything per call (set indices, segments, scales) is computed once on
the host from what the engine already knows. On CUDA each `.item()`, `.tolist()`, `nonzero()`, `bool(tensor)`
or device-to-host copy stalls the GPU; on CPU the same calls are cheap but they are still made, so this CPU
twin counts them in the UNet's forward."""

import torch
from torch.overrides import TorchFunctionMode

from distillery.adapters import AdapterRegistry
from distillery.model import DiffusionModel
from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_MODEL
from distillery.sampling.guidance import guidance_embedding

SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.__bool__,
         torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.any, torch.Tensor.all, torch.masked_select,
         torch.Tensor.__int__, torch.Tensor.__float__}


class SyncCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCS:
            self.calls.append(getattr(func, "__qualname__", str(func)))
        return func(*args, **(kwargs or {}))


def test_a_mixed_per_row_call_makes_no_host_sync():
    model = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    registry = AdapterRegistry(model, merged_budget_bytes=0)  # per-row LoRA: CUDA's default
    a = {n: registry.load(n, EMBEDDED_ADAPTERS / n) for n in ("guidance-toy", "lcm-toy", "stripes-toy")}
    sets = [(), ((a["guidance-toy"], 1.0),), ((a["lcm-toy"], 1.0), (a["stripes-toy"], 0.5)), ((a["stripes-toy"], 1.5),)]
    x = torch.randn(len(sets), *model.latent_shape(32, 32))
    t, text = torch.tensor([900, 500, 300, 100]), model.encode_prompts(["a red circle"] * len(sets))
    w = guidance_embedding(torch.tensor([0.0, 2.0, 1.0, 0.0]))
    with torch.no_grad():
        with registry.active(sets):  # the per-call host work (set indices, segments) happens here, once
            counter = SyncCounter()
            with counter:
                model.unet(x, t, **text.unet_kwargs(), timestep_cond=w)
    assert counter.calls == [], counter.calls
