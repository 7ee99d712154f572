"""Which LoRA backend runs a UNet call: measured at start-up on the model's own layers, per kind of call.

`measure` (the server's start, after the adapters load, before warm-up) times every available backend on one
UNet call of the configured batch: once with every row on ONE adapter set, once MIXING several (the loaded
adapters, or random ones of their layer shapes made here and never registered). First a self-check: a backend's
eps must match the per-row torch reference (the kernels' torch path) within a tolerance by dtype, or it is never
chosen. Then repetitions interleaved (A B C, A B C, ...), the median kept, the fastest per kind of call chosen:
one-set and mixed calls may run on different backends (`Routed` sends each call to its kind's). Nothing
measured (registries made by hand: tests, benchmarks): the fixed rule `default_choice`. An operator's forced
backend (DISTILLERY_ADAPTER_BACKEND; DISTILLERY_LORA_BACKEND is the kernels' own triton/torch switch) is taken
without timing.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distillery.adapters.backends.base import LoRABackend
from distillery.adapters.files import AdapterMeta
from distillery.adapters.loaded import AdapterSet, LoadedAdapter, set_key
from distillery.kernels import backend as kernel_path

log = logging.getLogger("distillery.backends")

CASES = ("one_set", "mixed")  # every row on one adapter set / rows of several sets in one call
NAMES = ("per_row", "merged", "compiled")  # what DISTILLERY_ADAPTER_BACKEND may force
REPEATS = 3  # timed calls per backend and case (the self-check's first), interleaved; the median counts
BUDGET_S = 3.0  # repetitions after the self-checks stop once choosing took this long (a loaded host: fewer samples)
MARGIN = 0.05  # the fixed rule's backend stays unless another is this much faster: timing noise flips no choice
MIXED_SETS = 3  # adapter sets of the mixed call, each on a contiguous run of rows (the engine groups rows by set)
SYNTHETIC_RANK = 16  # synthetic adapters' rank when no adapter is loaded to copy shapes from
# |eps - reference| / max |reference| allowed: summation order (merged W0 + BA vs x W0 + (x A) B) and Triton's tiles
TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass
class Choice:
    one_set: str
    mixed: str
    timings_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # case -> backend -> median ms
    forced: str | None = None  # the operator's DISTILLERY_ADAPTER_BACKEND, if not "auto"
    refused: dict[str, str] = field(default_factory=dict)  # backend -> why its self-check failed

    def report(self) -> dict:
        """What GET /model and the start-up log say."""
        return {"one_set": self.one_set, "mixed": self.mixed, "timings_ms": self.timings_ms, "forced": self.forced,
                "refused": self.refused}


def mixes(row_sets: list[AdapterSet]) -> bool:
    """Whether a call's rows use more than one adapter set (rows without adapters count as one)."""
    first = set_key(row_sets[0]) if row_sets else ()
    return any(set_key(chosen) != first for chosen in row_sets)


class Routed:
    """A LoRABackend running each call on the backend chosen for its kind (one set or mixed)."""

    name = "routed"

    def __init__(self, backends: dict[str, LoRABackend], choice: Choice):
        self.backends, self.choice = backends, choice

    def backend_for(self, row_sets: list[AdapterSet]) -> LoRABackend:
        return self.backends[self.choice.mixed if mixes(row_sets) else self.choice.one_set]

    def eps(self, x, t, cond, w_emb, row_sets: list[AdapterSet]) -> torch.Tensor:
        return self.backend_for(row_sets).eps(x, t, cond, w_emb, row_sets)

    def forget(self) -> None:
        for backend in self.backends.values():
            backend.forget()

    def active(self, row_sets: list[AdapterSet]):
        return self.backend_for(row_sets).active(row_sets)


def default_choice(backends: dict[str, LoRABackend], merged_budget_bytes: int) -> Choice:
    """Unmeasured: the compiled UNet when installed; else merged weights when they have a budget, else per-row."""
    name = "compiled" if "compiled" in backends else "merged" if merged_budget_bytes > 0 else "per_row"
    return Choice(name, name)


def forced_choice(backends: dict[str, LoRABackend], forced: str) -> Choice:
    if forced not in backends:
        raise ValueError(f"DISTILLERY_ADAPTER_BACKEND={forced!r} is not available here (available: "
                         f"{', '.join(sorted(backends))}; compiled needs DISTILLERY_COMPILE)")
    return Choice(forced, forced, forced=forced)


@contextmanager
def _torch_kernels():
    """The kernels' torch reference path for the calls inside (start-up only: nothing else runs then)."""
    before = os.environ.get("DISTILLERY_LORA_BACKEND")
    os.environ["DISTILLERY_LORA_BACKEND"] = "torch"
    try:
        yield
    finally:
        if before is None:
            del os.environ["DISTILLERY_LORA_BACKEND"]
        else:
            os.environ["DISTILLERY_LORA_BACKEND"] = before


def synthetic_adapters(model, like: list[LoadedAdapter], count: int, seed: int = 0) -> list[LoadedAdapter]:
    """`count` random style adapters with the layers and shapes of the adapters `like` (else rank-16 LoRA on every
    Linear serving layer), in memory, registered nowhere."""
    g = torch.Generator().manual_seed(seed)
    if like:
        shapes = {layer: (a.shape, b.shape) for adapter in like for layer, (a, b) in adapter.layers.items()}
    else:
        shapes = {name: ((SYNTHETIC_RANK, m.base.in_features), (m.base.out_features, SYNTHETIC_RANK))
                  for name, m in model.unet.named_modules() if isinstance(getattr(m, "base", None), torch.nn.Linear)}
    weight = model.unet.dtype, model.unet.device
    made = []
    for i in range(count):
        layers = {layer: tuple((torch.randn(shape, generator=g) * 0.05).to(weight[1], weight[0]) for shape in ab)
                  for layer, ab in shapes.items()}
        rank = max(a.shape[0] for a, _ in layers.values())
        meta = AdapterMeta(kind="style", base_fingerprint=model.fingerprint, rank=rank, alpha=float(rank),
                           target_modules=sorted(layers))
        made.append(LoadedAdapter(f"~timing-{i}", Path(f"~timing-{i}"), meta, layers, None))
    return made


def timing_calls(model, adapters: list[LoadedAdapter], rows: int) -> dict[str, list[AdapterSet]]:
    """Each case's row sets: the loaded adapters, one per set (with fewer than 2, synthetic ones of their shapes)."""
    if len(adapters) < 2:
        adapters = synthetic_adapters(model, adapters, MIXED_SETS)
    sets = [((adapter, 1.0),) for adapter in adapters[:min(MIXED_SETS, rows)]]
    per_set = -(-rows // len(sets))
    return {"one_set": [sets[0]] * rows, "mixed": [sets[i // per_set] for i in range(rows)]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(backend: LoRABackend, inputs: tuple, row_sets: list[AdapterSet], clock) -> tuple[torch.Tensor, float]:
    _sync(inputs[0].device)
    t0 = clock()
    out = backend.eps(*inputs, row_sets)
    _sync(inputs[0].device)
    return out, (clock() - t0) * 1e3


@torch.no_grad()
def measure(backends: dict[str, LoRABackend], inputs: tuple, calls: dict[str, list[AdapterSet]],
            prefer: str | None = None, clock=time.perf_counter, budget_s: float = BUDGET_S) -> Choice:
    """Self-check, then time every backend on `inputs` (x, t, cond, w_emb) for each case's row sets `calls`; the
    fastest wins, `prefer` (the fixed rule's) unless it is more than MARGIN slower. The self-check's call is the
    first of the REPEATS timed ones (a first call's extra cost, as Triton's autotuning, is what the median drops):
    on CPU, where per-row LoRA is the torch reference itself, 2 x REPEATS x backends UNet calls in all, fewer if
    they take over `budget_s` (each case its share; the self-checks always run)."""
    x = inputs[0]
    started = clock()
    tolerance = TOLERANCE.get(x.dtype, 1e-3)
    refused: dict[str, str] = {}
    timings: dict[str, dict[str, float]] = {}
    for case, row_sets in calls.items():
        with _torch_kernels():
            reference, reference_ms = _timed(backends["per_row"], inputs, row_sets, clock)
        scale = reference.abs().max().clamp_min(1e-6)
        times: dict[str, list[float]] = {}
        for name, backend in backends.items():
            if name in refused:
                continue
            try:  # also the warm-up: plans, merged weights, slot copies
                same = name == "per_row" and kernel_path(x.device) == "torch"  # the reference itself (CPU)
                out, ms = (reference, reference_ms) if same else _timed(backend, inputs, row_sets, clock)
                error = ((out - reference).abs().max() / scale).item()
            except Exception as exc:  # noqa: BLE001 - a backend that cannot run this call is not chosen
                refused[name] = f"{case}: {type(exc).__name__}: {exc}"
                continue
            if not error <= tolerance:  # NaN too
                refused[name] = f"{case}: eps differs from the per-row torch reference by {error:.2e} of its largest " \
                                f"value (allowed: {tolerance:g} in {x.dtype})"
                continue
            times[name] = [ms]
        for _ in range(REPEATS - 1):  # interleaved: A B C, A B C
            if clock() - started > budget_s * (len(timings) + 1) / len(calls):
                break
            for name, samples in times.items():
                samples.append(_timed(backends[name], inputs, row_sets, clock)[1])
        timings[case] = {name: round(statistics.median(ms), 3) for name, ms in times.items()}
    for name, why in refused.items():
        log.error("LoRA backend %s failed its self-check and is never chosen: %s", name, why)
    timings = {case: {n: ms for n, ms in times.items() if n not in refused} for case, times in timings.items()}
    if not all(timings.values()):
        raise RuntimeError(f"no LoRA backend computes the reference's eps: {refused}; set "
                           f"DISTILLERY_LORA_BACKEND=torch")
    chosen = {}
    for case in CASES:
        fastest = min(timings[case], key=timings[case].get)
        kept = prefer in timings[case] and timings[case][prefer] <= (1 + MARGIN) * timings[case][fastest]
        chosen[case] = prefer if kept else fastest
    return Choice(chosen["one_set"], chosen["mixed"], timings, refused=refused)


def log_table(choice: Choice, rows: int, took_ms: float) -> None:
    """The start-up log's table: backend x case, median ms, the chosen one starred; and what choosing cost."""
    if choice.forced:
        log.info("LoRA backend forced: %s (DISTILLERY_ADAPTER_BACKEND)", choice.forced)
        return
    lines = [f"LoRA backends timed on one UNet call of {rows} rows (median ms; * chosen; choosing took "
             f"{took_ms:.0f} ms):",
             f"  {'backend':<10}" + "".join(f"{case:>12}" for case in CASES)]
    for name in sorted({n for times in choice.timings_ms.values() for n in times} | set(choice.refused)):
        cells = [f"{choice.timings_ms[case][name]:.1f}{'*' if getattr(choice, case) == name else ' '}"
                 if name in choice.timings_ms.get(case, {}) else "refused " for case in CASES]
        lines.append(f"  {name:<10}" + "".join(f"{c:>12}" for c in cells))
    log.info("\n".join(lines))
