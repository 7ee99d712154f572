"""Slot layers (the compiled UNet's): the same eps as the eager serving layers, and no recompilation across
adapter swaps, sets, weights, w and batch sizes within the buckets."""

import random

import pytest
import torch
from torch._dynamo.utils import counters

from distillery.adapters import AdapterError, AdapterRegistry
from distillery.adapters.backends.compiled import SlotAdapters, bucket_of
from distillery.model import Conditioning, DiffusionModel
from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_MODEL
from distillery.sampling.guidance import EMBEDDING_DIM, guidance_embedding

NAMES = ["guidance-toy", "lcm-toy", "stripes-toy", "progressive-toy-4"]


@pytest.fixture(scope="module")
def served():
    """The eager served model (per-row LoRA) with the adapters, and a second copy with slot layers."""
    eager = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    registry = AdapterRegistry(eager, merged_budget_bytes=0)
    adapters = {n: registry.load(n, EMBEDDED_ADAPTERS / n) for n in NAMES}
    model = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    slots = SlotAdapters(model.unet, EMBEDDING_DIM, slots=3, rank=16,
                         targets=set().union(*(a.layers for a in adapters.values())), backend="eager")
    for name in NAMES[:3]:
        slots.load(adapters[name])
    return eager, registry, adapters, model, slots


def _inputs(model, sets, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = len(sets)
    x = torch.randn(rows, *model.latent_shape(32, 32), generator=g)
    t = torch.randint(1, 1000, (rows,), generator=g)
    text = Conditioning(torch.randn(rows, 8, model.unet.config.cross_attention_dim, generator=g))
    w = guidance_embedding(torch.rand(rows, generator=g) * 5)
    return x, t, text, w


def _eager(eager, registry, sets, x, t, text, w):
    with torch.no_grad(), registry.active(sets):
        return eager.unet(x, t, **text.unet_kwargs(), timestep_cond=w).sample


def test_slots_compute_what_the_serving_layers_do_for_a_mixed_batch(served):
    eager, registry, a, model, slots = served
    sets = [(), ((a["guidance-toy"], 1.0),), ((a["lcm-toy"], 1.0), (a["stripes-toy"], 0.5)),
            ((a["stripes-toy"], 1.5),), ((a["guidance-toy"], 1.0), (a["stripes-toy"], 0.8))]
    x, t, text, w = _inputs(model, sets)
    with torch.no_grad():
        got = slots.forward(x, t, text, w, *slots.coefficients(sets, len(sets)))
    torch.testing.assert_close(got, _eager(eager, registry, sets, x, t, text, w), rtol=1e-4, atol=1e-4)


def test_a_swapped_in_adapter_takes_the_slot_in_place(served):
    eager, registry, a, model, slots = served
    buffer = slots.layers[next(iter(slots.layers))].lora_a
    slots.unload("guidance-toy")
    try:
        assert slots.load(a["progressive-toy-4"]) == 0 and slots.layers[next(iter(slots.layers))].lora_a is buffer
        sets = [((a["progressive-toy-4"], 1.0),), ((a["stripes-toy"], 1.0),)]
        x, t, text, w = _inputs(model, sets, seed=1)
        with torch.no_grad():
            got = slots.forward(x, t, text, w, *slots.coefficients(sets, 2))
        torch.testing.assert_close(got, _eager(eager, registry, sets, x, t, text, w), rtol=1e-4, atol=1e-4)
    finally:
        slots.unload("progressive-toy-4")
        slots.load(a["guidance-toy"])


def test_no_recompiles_across_swaps_sets_weights_w_and_bucketed_batch_sizes(served):
    """Dynamo's guards decide recompilation whatever the backend: `eager` keeps the test fast. Four adapters
    take turns in three slots (`eps` copies in what a call needs), sets, weights, w and row counts vary."""
    eager, registry, a, model, slots = served
    rng = random.Random(0)

    def call(rows: int, seed: int):
        pool = rng.sample(NAMES[:2] + NAMES[3:], 2)  # with stripes-toy: at most the 3 slots in one call
        sets = [tuple((a[n], rng.choice([0.5, 1.0])) for n in rng.sample(pool, rng.randint(0, 1)))
                + (((a["stripes-toy"], 0.7),) if rng.random() < 0.5 else ()) for _ in range(rows)]
        x, t, text, w = _inputs(model, sets, seed)
        with torch.no_grad():
            got = slots.eps(x, t, text, w, sets)
        torch.testing.assert_close(got, _eager(eager, registry, sets, x, t, text, w), rtol=1e-4, atol=1e-4)

    for size in (1, 2, 4):  # warm-up: one graph per bucket
        call(size, 0)
    graphs = counters["stats"]["unique_graphs"]
    for i in range(12):
        call(rng.randint(1, 4), i)
    assert counters["stats"]["unique_graphs"] == graphs


def test_loading_what_slots_cannot_hold_is_refused(served):
    _, _, a, _, slots = served
    for name in [n for n in slots.loaded if n not in NAMES[:3]]:
        slots.unload(name)
    for name in NAMES[:3]:
        if name not in slots.loaded:
            slots.load(a[name])
    with pytest.raises(AdapterError, match="slots are taken"):
        slots.load(a["progressive-toy-4"])
    with pytest.raises(AdapterError, match="3 slots"):
        slots.ensure([tuple((a[n], 1.0) for n in NAMES)])
    with pytest.raises(ValueError, match="largest bucket"):
        bucket_of(17)
