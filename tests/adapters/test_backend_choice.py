"""The LoRA backend is chosen by measurement: the fastest per kind of call (one set / mixed) after a self-check
against the per-row torch reference; a backend failing it is never chosen; an operator can force one; GET /model
and /metrics report the choice."""

import pytest
import torch
from fastapi.testclient import TestClient

from distillery.adapters import AdapterRegistry
from distillery.adapters.backends import CASES, Routed, measure, timing_calls
from distillery.adapters.backends.choice import mixes
from distillery.model import Conditioning, DiffusionModel
from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_MODEL
from distillery.serving.app import create_app
from distillery.serving.config import Settings
from distillery.serving.engine import Engine

EPS = torch.arange(24.0).view(2, 3, 2, 2)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeBackend:
    """A backend whose eps costs `ms[case]` on the fake clock and returns EPS (+ `error`), or raises `fails`."""

    def __init__(self, name: str, clock: Clock, ms: dict[str, float], error: float = 0.0, fails: bool = False):
        self.name, self.clock, self.ms, self.error, self.fails = name, clock, ms, error, fails
        self.calls: list[str] = []

    def eps(self, x, t, cond, w_emb, row_sets):
        case = "mixed" if mixes(row_sets) else "one_set"
        self.calls.append(case)
        if self.fails:
            raise RuntimeError("this device cannot run it")
        self.clock.now += self.ms[case] / 1e3
        return EPS + self.error

    def forget(self):
        pass


CALLS = {"one_set": [(("a", 1.0),)] * 2, "mixed": [(("a", 1.0),), ()]}  # only their keys are read
INPUTS = (torch.zeros(2, 3, 2, 2), None, None, None)


@pytest.fixture(autouse=True)
def set_key_of_names(monkeypatch):
    """The fakes' row sets name adapters by strings: set keys of (name, weight) pairs."""
    monkeypatch.setattr("distillery.adapters.backends.choice.set_key", lambda chosen: tuple(chosen))


def test_the_fastest_backend_of_each_kind_of_call_is_chosen():
    clock = Clock()
    backends = {"per_row": FakeBackend("per_row", clock, {"one_set": 5, "mixed": 2}),
                "merged": FakeBackend("merged", clock, {"one_set": 1, "mixed": 4}),
                "compiled": FakeBackend("compiled", clock, {"one_set": 3, "mixed": 3})}
    choice = measure(backends, INPUTS, CALLS, clock=clock)
    assert (choice.one_set, choice.mixed, choice.refused) == ("merged", "per_row", {})
    assert choice.timings_ms == {"one_set": {"per_row": 5, "merged": 1, "compiled": 3},
                                 "mixed": {"per_row": 2, "merged": 4, "compiled": 3}}
    routed = Routed(backends, choice)
    routed.eps(*INPUTS, CALLS["mixed"])
    routed.eps(*INPUTS, CALLS["one_set"])
    assert backends["per_row"].calls[-1] == "mixed" and backends["merged"].calls[-1] == "one_set"


def test_a_slow_host_takes_the_self_checks_alone_as_its_samples():
    """Choosing is bounded: repetitions stop once it took the budget; the self-checks (timed) always run."""
    clock = Clock()
    backends = {"per_row": FakeBackend("per_row", clock, {"one_set": 2000, "mixed": 2000}),
                "merged": FakeBackend("merged", clock, {"one_set": 1000, "mixed": 3000})}
    choice = measure(backends, INPUTS, CALLS, clock=clock, budget_s=3.0)
    assert len(backends["per_row"].calls) == len(backends["merged"].calls) == 2  # one call per case each
    assert (choice.one_set, choice.mixed) == ("merged", "per_row")


def test_the_fixed_rules_backend_stays_unless_another_is_clearly_faster():
    clock = Clock()
    backends = {"per_row": FakeBackend("per_row", clock, {"one_set": 1.0, "mixed": 1.0}),
                "merged": FakeBackend("merged", clock, {"one_set": 1.04, "mixed": 1.2})}
    choice = measure(backends, INPUTS, CALLS, prefer="merged", clock=clock)
    assert (choice.one_set, choice.mixed) == ("merged", "per_row")  # within 5%: noise; 20%: measured


@pytest.mark.parametrize("broken", [{"error": 1.0}, {"error": float("nan")}, {"fails": True}],
                         ids=["wrong", "nan", "raises"])
def test_a_backend_failing_its_self_check_is_never_chosen_however_fast(broken):
    clock = Clock()
    backends = {"per_row": FakeBackend("per_row", clock, {"one_set": 5, "mixed": 5}),
                "merged": FakeBackend("merged", clock, {"one_set": 0.1, "mixed": 0.1}, **broken)}
    choice = measure(backends, INPUTS, CALLS, clock=clock)
    assert (choice.one_set, choice.mixed) == ("per_row", "per_row")
    assert "merged" in choice.refused and all("merged" not in times for times in choice.timings_ms.values())
    assert "reference" in choice.refused["merged"] or "cannot run" in choice.refused["merged"]


def test_calls_mix_when_their_rows_use_different_sets():
    assert not mixes([(("a", 1.0),)] * 3) and not mixes([(), ()])
    assert mixes([(("a", 1.0),), (("a", 0.5),)]) and mixes([(("a", 1.0),), ()])


@pytest.fixture(scope="module")
def registry():
    model = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    registry = AdapterRegistry(model, merged_budget_bytes=1 << 30)
    registry.load("stripes-toy", EMBEDDED_ADAPTERS / "stripes-toy")
    return registry


def _inputs(model, rows: int):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(rows, *model.latent_shape(32, 32), generator=g), torch.randint(1, 1000, (rows,), generator=g),
            Conditioning(torch.randn(rows, 8, model.unet.config.cross_attention_dim, generator=g)),
            torch.randn(rows, 256, generator=g))


def test_the_toy_is_timed_on_its_own_layers_without_registering_anything(registry):
    """One adapter loaded: the mixed call's sets are random adapters of its layers and shapes, registered nowhere."""
    calls = timing_calls(registry.model, [registry.get("stripes-toy")], rows=4)
    layers = set(registry.get("stripes-toy").layers)
    assert len({tuple(s) for s in calls["mixed"]}) == 2 and len({tuple(s) for s in calls["one_set"]}) == 1
    assert all(set(a.layers) == layers for chosen in calls["mixed"] for a, _ in chosen)
    choice = registry.choose("auto", _inputs(registry.model, 4))
    assert choice.refused == {} and {choice.one_set, choice.mixed} <= {"per_row", "merged"}
    assert all(set(choice.timings_ms[case]) == {"per_row", "merged"} for case in CASES)
    assert sorted(registry.known) == ["stripes-toy"]


def test_forcing_a_backend_takes_it_untimed(registry):
    try:
        choice = registry.choose("per_row", _inputs(registry.model, 2))
        assert (choice.one_set, choice.mixed, choice.forced, choice.timings_ms) == ("per_row", "per_row", "per_row", {})
        assert registry.backend is registry.backends["per_row"]
        with pytest.raises(ValueError, match="compiled needs DISTILLERY_COMPILE"):
            registry.choose("compiled", _inputs(registry.model, 2))
    finally:
        registry.measured = None


def test_get_model_and_metrics_report_the_choice():
    with TestClient(create_app(Settings(adapter_backend="merged"))) as client:
        assert client.get("/model").json()["lora_backends"] == {
            "one_set": "merged", "mixed": "merged", "timings_ms": {}, "forced": "merged", "refused": {}}
        assert 'distillery_lora_backend_chosen{backend="merged",case="mixed"} 1.0' in client.get("/metrics").text


def test_the_engine_times_the_backends_at_its_batch():
    engine = Engine(DiffusionModel.from_pretrained(EMBEDDED_MODEL))
    report = engine.choose_lora_backends("auto", rows=2)  # no adapter loaded: random ones on every Linear layer
    assert report == engine.lora_backends() and report["forced"] is None
    assert set(report["timings_ms"]) == set(CASES) and report["one_set"] in report["timings_ms"]["one_set"]
    text = engine.metrics.exposition().decode()
    assert f'distillery_lora_backend_ms{{backend="per_row",case="mixed"}} {report["timings_ms"]["mixed"]["per_row"]}' \
        in text


def test_deterministic_mode_times_nothing_and_takes_the_fixed_rule():
    """An image's bits in deterministic mode must not hang on which backend a start-up timing happened to pick."""
    engine = Engine(DiffusionModel.from_pretrained(EMBEDDED_MODEL), deterministic=True)
    engine.warmup()
    assert engine.lora_backends() == {"one_set": "merged", "mixed": "merged", "timings_ms": {}, "forced": None,
                                      "refused": {}}
