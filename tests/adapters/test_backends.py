"""The LoRA backend interface: every backend computes the reference's eps (per-row LoRA in torch ops) for the
calls the pipeline makes (one set on every row, several sets, rows without adapters), and the registry picks
them by the one rule."""

import pytest
import torch

from distillery.adapters import AdapterRegistry, SlotAdapters
from distillery.adapters.backends import available_backends, default_choice
from distillery.model import Conditioning, DiffusionModel
from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_MODEL
from distillery.sampling.guidance import EMBEDDING_DIM, guidance_embedding

NAMES = ["guidance-toy", "lcm-toy", "stripes-toy"]


@pytest.fixture(scope="module")
def served():
    """Every backend: per-row and merged on one eager copy of the model, compiled (slot layers, no torch.compile:
    the same arithmetic, and fast) on a second copy (whose registry has its own per-row and merged too)."""
    eager = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    registry = AdapterRegistry(eager, merged_budget_bytes=1 << 30)
    adapters = {n: registry.load(n, EMBEDDED_ADAPTERS / n) for n in NAMES}
    model = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    slots = SlotAdapters(model.unet, EMBEDDING_DIM, slots=3, rank=16,
                         targets=set().union(*(a.layers for a in adapters.values())))
    compiled = AdapterRegistry(model, slots=slots)
    return registry, compiled, adapters


CALLS = {"one set": "mmm", "one set and base rows": "-gg", "several sets": "gmss", "several sets, base rows between": "s-g-m"}


def _row_sets(a, call: str) -> list:
    """A call's rows: g the guidance adapter, m two adapters composed, s one at weight 1.5, - none."""
    sets = {"g": ((a["guidance-toy"], 1.0),), "m": ((a["lcm-toy"], 1.0), (a["stripes-toy"], 0.5)),
            "s": ((a["stripes-toy"], 1.5),), "-": ()}
    return [sets[c] for c in CALLS[call]]


def _inputs(model, rows: int):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, *model.latent_shape(32, 32), generator=g)
    t = torch.randint(1, 1000, (rows,), generator=g)
    cond = Conditioning(torch.randn(rows, 8, model.unet.config.cross_attention_dim, generator=g))
    return x, t, cond, guidance_embedding(torch.rand(rows, generator=g) * 5)


@pytest.mark.parametrize("call", list(CALLS))
def test_every_backend_gives_the_reference_eps(served, monkeypatch, call):
    registry, compiled, a = served
    row_sets = _row_sets(a, call)
    inputs = _inputs(registry.model, len(row_sets))
    backends = {**registry.backends, **compiled.backends}
    assert sorted(backends) == ["compiled", "merged", "per_row"]
    with torch.no_grad():
        monkeypatch.setenv("DISTILLERY_LORA_BACKEND", "torch")  # the reference: per-row LoRA, torch ops
        expected = backends["per_row"].eps(*inputs, row_sets)
        base = backends["per_row"].eps(*inputs, [()] * len(row_sets))
        monkeypatch.delenv("DISTILLERY_LORA_BACKEND")
        for name, backend in backends.items():
            assert backend.name == name
            torch.testing.assert_close(backend.eps(*inputs, row_sets), expected, rtol=1e-4, atol=1e-4, msg=name)
    for i, chosen in enumerate(row_sets):  # adapters change their rows, and only theirs (up to fp32 rounding)
        if chosen:
            assert (expected[i] - base[i]).abs().max() > 1e-2
        else:
            torch.testing.assert_close(expected[i], base[i], rtol=0, atol=1e-5)


def test_unmeasured_the_registry_picks_its_backend_by_the_fixed_rule(served):
    """Registries made by hand (tests, benchmarks) are never timed: backends/choice.py's default_choice."""
    registry, compiled, _ = served
    assert compiled.backend is compiled.slots and compiled.backend.name == "compiled"
    assert registry.backend.name == "merged"
    registry.merged_budget_bytes = 0
    try:
        assert registry.backend.name == "per_row" and registry.backends["merged"].budget_bytes == 0
    finally:
        registry.merged_budget_bytes = 1 << 30
    assert default_choice(registry.backends, 1).one_set == "merged"


def test_a_unet_serves_one_registry_only(served):
    registry, _, _ = served
    with pytest.raises(RuntimeError, match="already has serving layers"):
        available_backends(registry.model)


def test_entries_list_every_adapter_with_its_residency(served):
    registry, _, a = served
    chosen = ((a["lcm-toy"], 1.0),)
    registry.acquire(chosen)
    try:
        entries = registry.entries()
    finally:
        registry.release(chosen)
    assert [e.name for e in entries] == sorted(NAMES)
    lcm = entries[sorted(NAMES).index("lcm-toy")]
    assert lcm == ("lcm-toy", EMBEDDED_ADAPTERS / "lcm-toy", a["lcm-toy"], 1)
    assert [e.in_use for e in registry.entries()] == [0, 0, 0]
