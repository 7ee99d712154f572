"""The compiled backend: adapters copied into the fixed slots of a torch.compile'd UNet (slots.py's layers).

torch.compile specialises a graph on the Python objects a forward reads. The eager serving layers read a
per-call `CallPlan` (a new object, set count and rank per row pattern), so compiled they would recompile
for every adapter set. Here the slot layers read only fixed buffers and two coefficient tensors, and rows
are padded to a few batch-size buckets (zero rows, zero coefficients), one graph per bucket and latent
size. After warm-up, adapter swaps, adapter sets, weights, w and batch sizes cause no recompilation
(bench/compile.py counts them); a call of more rows than the largest bucket runs as several calls.

The slot layers go into a copy of the UNet's module tree that shares every parameter and buffer (W0 is never
copied): the caller's UNet stays as it was, so the eager backends serve it beside this one. In the server
(`background=True`) nothing compiles on the serving thread once warm: a latent size not compiled yet runs the
same slot UNet eagerly while a thread of its own compiles it. The compiled function runs on a second such
copy with a context of its own, so that compile (it runs its graph once, and sets its context) never touches
the context an eager call on the serving thread is reading.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
import weakref
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from distillery.adapters.files import AdapterError
from distillery.adapters.layers import servable_layers
from distillery.adapters.loaded import AdapterSet, LoadedAdapter
from distillery.adapters.slots import SlotContext, SlotLayer, SlotProjection
from distillery.model import Conditioning, unet_kwargs

log = logging.getLogger("distillery.compile")

BUCKETS = (1, 2, 4, 8, 16)  # rows per UNet call: a call is padded to the next one
MAX_GRAPHS = 128  # (bucket, shape) graphs compiled at most; beyond, new shapes stay eager (dynamo's limits too)


def bucket_of(rows: int) -> int:
    for size in BUCKETS:
        if rows <= size:
            return size
    raise ValueError(f"{rows} rows: more than the largest bucket ({BUCKETS[-1]})")


def shared_copy(module: nn.Module) -> nn.Module:
    """A copy of `module`'s tree of modules holding the very same parameters and buffers (no tensor copied)."""
    return copy.deepcopy(module, {id(t): t for t in itertools.chain(module.parameters(), module.buffers())})


class SlotForward:
    """eps for padded rows through a slot UNet: what is compiled (the coefficients become graph inputs)."""

    def __init__(self, unet, context: SlotContext):
        self.unet, self.context = unet, context

    def __call__(self, x, t, w_emb, row_coef, proj_coef, *cond) -> torch.Tensor:
        """`cond`: the conditioning's tensors (text; for SDXL also pooled embeds and size ids)."""
        self.context.row_coef, self.context.proj_coef = row_coef, proj_coef
        return self.unet(x, t, **unet_kwargs(*cond), timestep_cond=w_emb).sample


class SlotAdapters:
    """The compiled backend: slot layers installed into a copy of a UNet's module tree sharing its weights (an
    explicit step, like AdapterRegistry's serving layers) for the layers `targets` (default: every servable
    one), S `slots` of rank `rank`, w
    projections from `embedding_dim` features (sampling.guidance.EMBEDDING_DIM). `eps` runs a UNet call for
    any row sets: adapters not in a slot are copied in (least recently used out), rows padded to a bucket,
    through `torch.compile(backend=backend)` (torch.compile's backend; None: no compiling; "eager": dynamo's
    graphs and guards without code generation)."""

    name = "compiled"

    def __init__(self, unet, embedding_dim: int, slots: int = 8, rank: int = 16, targets: set[str] | None = None,
                 backend: str | None = None, background: bool = False):
        """`background`: new shapes compile on a thread of their own, the call running eagerly meanwhile (the
        server); False: where they are first called (benchmarks, tests)."""
        self.slots, self.rank, self.context = slots, rank, SlotContext()
        self.unet = unet = shared_copy(unet)
        # name -> (slot, adapter), least recently used first; a dict, not a cachetools.LRUCache: the adapter
        # leaving must be one the call at hand does not need, and its slot goes to the newcomer
        self.loaded: dict[str, tuple[int, LoadedAdapter]] = {}
        self.fallback = None  # a LoRABackend for calls the slots cannot hold (available_backends sets per-row)
        self._holdable: weakref.WeakKeyDictionary[LoadedAdapter, bool] = weakref.WeakKeyDictionary()
        emb = unet.time_embedding
        unet.time_embedding.cond_proj = SlotProjection(emb.linear_1.in_features, embedding_dim, slots, self.context,
                                                       emb.linear_1.weight)
        self.layers: dict[str, SlotLayer] = {}
        for name in sorted(servable_layers(unet) if targets is None else targets):
            base = unet.get_submodule(name)
            if name not in servable_layers(unet):
                raise AdapterError(f"layer {name!r} is {type(base).__name__}: slot LoRA takes Linear and zero-padded "
                                   f"ungrouped Conv2d layers")
            self.layers[name] = SlotLayer(base, slots, rank, self.context)
            unet.set_submodule(name, self.layers[name])
        self.eager = SlotForward(unet, self.context)
        self._compiled = None
        self.compiles: Counter[str] = Counter()  # graphs compiled, by the name of the thread that compiled them
        self.ready: set[tuple] = set()  # the (bucket, shapes) keys compiled
        self._scheduled: set[tuple] = set()
        self._compiler = ThreadPoolExecutor(1, thread_name_prefix="slot-compile") if backend and background else None
        if backend:
            twin = shared_copy(unet)  # slot buffers shared too; its own context
            inner = torch._dynamo.lookup_backend(backend)

            def counted(gm, example_inputs):
                self.compiles[threading.current_thread().name] += 1
                return inner(gm, example_inputs)

            self._compiled = torch.compile(SlotForward(twin, twin.time_embedding.cond_proj.context), backend=counted,
                                          dynamic=False)

    def load(self, adapter: LoadedAdapter, slot: int | None = None) -> int:
        """Copy `adapter` into `slot` (default: a free one), in place: no recompilation; returns the slot."""
        if slot is None:
            used = {s for s, _ in self.loaded.values()}
            slot = next((s for s in range(self.slots) if s not in used), None)
        if slot is None:
            raise AdapterError(f"all {self.slots} slots are taken ({sorted(self.loaded)}); unload one first")
        if not set(adapter.layers) <= set(self.layers):
            raise AdapterError(f"adapter {adapter.name!r} targets layers without slots: "
                               f"{sorted(set(adapter.layers) - set(self.layers))[:3]}")
        if any(a.shape[0] > self.rank for a, _ in adapter.layers.values()):
            raise AdapterError(f"adapter {adapter.name!r} has a rank above the slots' {self.rank} "
                               f"(DISTILLERY_COMPILE_RANK)")
        for name, layer in self.layers.items():
            if name in adapter.layers:
                layer.load(slot, *adapter.layers[name])
            else:
                layer.clear(slot)
        with torch.no_grad():
            proj = self.unet.time_embedding.cond_proj.weight
            proj[slot].zero_()
            if adapter.projection is not None:
                proj[slot].copy_(adapter.projection)
        self.loaded[adapter.name] = (slot, adapter)
        return slot

    def unload(self, name: str) -> None:
        slot, _ = self.loaded.pop(name)
        for layer in self.layers.values():
            layer.clear(slot)
        with torch.no_grad():
            self.unet.time_embedding.cond_proj.weight[slot].zero_()

    def holds(self, row_sets: list[AdapterSet]) -> bool:
        """Whether the slots can take this call's adapters: each within the rank and the layers with slots, no
        row's set more adapters than there are slots (a call of more adapters than slots runs in parts)."""
        for chosen in row_sets:
            if len(chosen) > self.slots:
                return False
            for adapter, _ in chosen:
                if adapter not in self._holdable:
                    self._holdable[adapter] = set(adapter.layers) <= set(self.layers) and all(
                        a.shape[0] <= self.rank for a, _ in adapter.layers.values())
                if not self._holdable[adapter]:
                    return False
        return True

    def ensure(self, row_sets: list[AdapterSet]) -> None:
        """Every adapter of `row_sets` in a slot (the object itself: one reloaded under its name is copied
        again), the least recently used ones not needed here making room."""
        needed = {a.name: a for chosen in row_sets for a, _ in chosen}
        if len(needed) > self.slots:
            raise AdapterError(f"one UNet call uses {len(needed)} adapters; the compiled UNet has {self.slots} slots "
                               f"(DISTILLERY_COMPILE_SLOTS)")
        for name, adapter in needed.items():
            held = self.loaded.pop(name, None)
            if held is not None and held[1] is adapter:
                self.loaded[name] = held  # most recently used now
                continue
            slot = held[0] if held else None
            if slot is None and len(self.loaded) == self.slots:
                victim = next(n for n in self.loaded if n not in needed)
                slot = self.loaded.pop(victim)[0]
            self.load(adapter, slot)

    def coefficients(self, row_sets: list[AdapterSet], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row_coef (rows, S R), proj_coef (rows, S)) for `row_sets` padded with zero rows to `rows`."""
        row_coef = torch.zeros(rows, self.slots, self.rank)
        proj_coef = torch.zeros(rows, self.slots)
        for i, chosen in enumerate(row_sets):
            for adapter, weight in chosen:
                slot, _ = self.loaded[adapter.name]
                row_coef[i, slot] = weight * adapter.scale
                if adapter.projection is not None:
                    proj_coef[i, slot] = 1.0
        like = self.unet.time_embedding.cond_proj.weight
        return row_coef.view(rows, -1).to(like), proj_coef.to(like)

    def compiled(self, *args) -> torch.Tensor:
        """The compiled slot UNet's eps, dynamo's recompile limits raised to one graph per key (MAX_GRAPHS keys)
        for the thread at hand: dynamo's config overrides hold per thread, so one made where this object was
        built would not reach the compile thread, which then fell back to eager at dynamo's default 8 graphs
        (counted across every SlotAdapters of the process: they share a code object)."""
        config = torch._dynamo.config
        with config.patch(recompile_limit=max(config.recompile_limit, MAX_GRAPHS + 1),
                          accumulated_recompile_limit=max(config.accumulated_recompile_limit, 2 * MAX_GRAPHS)):
            return self._compiled(*args)

    def forward(self, x, t, cond: Conditioning, w_emb, row_coef, proj_coef) -> torch.Tensor:
        """eps for padded rows, eagerly (uncompiled) through the slot UNet."""
        return self.eager(*_flat(x, t, cond, w_emb, row_coef, proj_coef))

    def forget(self) -> None:
        """Nothing to drop: a slot holds the adapter object itself, and one reloaded under its name is another
        object (`ensure` copies it in again)."""

    def parts(self, row_sets: list[AdapterSet]) -> list[slice]:
        """The call's rows in runs one slot UNet call takes: at most the largest bucket, adapters within the slots."""
        runs, start, names = [], 0, set()
        for i, chosen in enumerate(row_sets):
            row = {a.name for a, _ in chosen}
            if i - start == BUCKETS[-1] or len(names | row) > self.slots:
                runs.append(slice(start, i))
                start, names = i, set()
            names |= row
        return runs + [slice(start, len(row_sets))]

    @torch.no_grad()
    def eps(self, x, t, cond: Conditioning, w_emb, row_sets: list[AdapterSet]) -> torch.Tensor:
        """eps (rows, C, h, w) of one UNet call whose rows use `row_sets`: in runs the slots hold, each padded to its
        bucket, run, cut; a call the slots cannot hold at all runs on the fallback backend."""
        if self.fallback is not None and not self.holds(row_sets):
            return self.fallback.eps(x, t, cond, w_emb, row_sets)
        t = t.to(torch.float32)  # DDIM's are integers, Euler's floats: one dtype, one graph
        out = [self._run(x[rows], t[rows], cond[rows], w_emb[rows], row_sets[rows]) for rows in self.parts(row_sets)]
        return out[0] if len(out) == 1 else torch.cat(out)

    def _run(self, x, t, cond: Conditioning, w_emb, row_sets: list[AdapterSet]) -> torch.Tensor:
        rows = x.shape[0]
        size = bucket_of(rows)
        self.ensure(row_sets)
        row_coef, proj_coef = self.coefficients(row_sets, size)
        pad = (lambda v: torch.cat([v, v.new_zeros(size - rows, *v.shape[1:])])) if size > rows else (lambda v: v)
        args = _flat(pad(x), pad(t), cond.map(pad), pad(w_emb), row_coef, proj_coef)
        if self._compiled is None:
            return self.eager(*args)[:rows]
        key = _key(args)
        if key in self.ready or self._compiler is None:
            self.ready.add(key)
            return self.compiled(*args)[:rows]
        if key not in self._scheduled and len(self._scheduled) < MAX_GRAPHS:
            self._scheduled.add(key)
            self._compiler.submit(self._compile, key)
        return self.eager(*args)[:rows]  # this shape's graph is not there yet: the same slot UNet, uncompiled

    @torch.no_grad()
    def _compile(self, key: tuple) -> None:
        """Compile the graph of `key` (on the compile thread, or at warm-up): zeros of its shapes through it once."""
        try:
            self.compiled(*(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in key))
        except Exception:  # noqa: BLE001 - that shape stays eager; nothing else is affected
            log.exception("compiling the slot UNet for %s failed; those calls stay eager", key[0][0])
            return
        self.ready.add(key)
        log.info("slot UNet compiled for rows x latent %s", key[0][0])

    def drain(self) -> None:
        """Wait for the compiles scheduled so far (tests; a server never waits for them)."""
        if self._compiler is not None:
            self._compiler.submit(lambda: None).result()

    @torch.no_grad()
    def warm(self, latent: tuple[int, ...], cond: Conditioning) -> None:
        """Compile every bucket for one latent shape (C, h, w) and `cond`'s shapes (one row) here: before traffic."""
        if self._compiled is None:
            return
        like = self.unet.time_embedding.cond_proj.weight

        def zeros(*shape, dtype=like.dtype):
            return torch.zeros(shape, dtype=dtype, device=like.device)

        for size in BUCKETS:
            self._compile(_key(_flat(zeros(size, *latent), zeros(size, dtype=torch.float32), cond.repeat(size),
                                     zeros(size, like.shape[2]), zeros(size, self.slots * self.rank),
                                     zeros(size, self.slots))))


def _flat(x, t, cond: Conditioning, w_emb, row_coef, proj_coef) -> tuple[torch.Tensor, ...]:
    """The compiled function's arguments: tensors only, the conditioning's last (as many as its family has)."""
    return (x, t, w_emb, row_coef, proj_coef, *(v for v in cond.tensors() if v is not None))


def _key(args: tuple[torch.Tensor, ...]) -> tuple:
    """What a graph is compiled for: its arguments' shapes, dtypes and devices."""
    return tuple((tuple(a.shape), a.dtype, a.device) for a in args)
