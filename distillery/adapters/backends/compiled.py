"""The compiled backend: adapters copied into the fixed slots of a torch.compile'd UNet (slots.py's layers).

torch.compile specialises a graph on the Python objects a forward reads. The eager serving layers read a
per-call `CallPlan` (a new object, set count and rank per row pattern), so compiled they would recompile
for every adapter set. Here the slot layers read only fixed buffers and two coefficient tensors, and rows
are padded to a few batch-size buckets (zero rows, zero coefficients), one graph per bucket and latent
size, compiled at warm-up. After warm-up, adapter swaps, adapter sets, weights, w and batch sizes within
the buckets cause no recompilation (bench/compile.py counts them).
"""

from __future__ import annotations

import torch

from distillery.adapters.files import AdapterError
from distillery.adapters.layers import servable_layers
from distillery.adapters.loaded import AdapterSet, LoadedAdapter
from distillery.adapters.slots import SlotContext, SlotLayer, SlotProjection

BUCKETS = (1, 2, 4, 8, 16)  # rows per UNet call: a call is padded to the next one


def bucket_of(rows: int) -> int:
    for size in BUCKETS:
        if rows <= size:
            return size
    raise ValueError(f"{rows} rows: more than the largest bucket ({BUCKETS[-1]})")


class SlotAdapters:
    """The compiled backend: slot layers installed into a UNet (an explicit step, like AdapterRegistry's
    serving layers) for the layers `targets` (default: every servable one), S `slots` of rank `rank`, w
    projections from `embedding_dim` features (sampling.guidance.EMBEDDING_DIM). `eps` runs a UNet call for
    any row sets: adapters not in a slot are copied in (least recently used out), rows padded to a bucket,
    through `torch.compile(backend=backend)` (torch.compile's backend; None: no compiling; "eager": dynamo's
    graphs and guards without code generation)."""

    name = "compiled"

    def __init__(self, unet, embedding_dim: int, slots: int = 8, rank: int = 16, targets: set[str] | None = None,
                 backend: str | None = None):
        self.unet, self.slots, self.rank, self.context = unet, slots, rank, SlotContext()
        # name -> (slot, adapter), least recently used first; a dict, not a cachetools.LRUCache: the adapter
        # leaving must be one the call at hand does not need, and its slot goes to the newcomer
        self.loaded: dict[str, tuple[int, LoadedAdapter]] = {}
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
        self.run = torch.compile(self.forward, backend=backend, dynamic=False) if backend else self.forward

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

    def forward(self, x, t, text, w_emb, row_coef, proj_coef) -> torch.Tensor:
        """eps for padded rows: the function compiled (the coefficients become graph inputs)."""
        self.context.row_coef, self.context.proj_coef = row_coef, proj_coef
        return self.unet(x, t, encoder_hidden_states=text, timestep_cond=w_emb).sample

    def forget(self) -> None:
        """Nothing to drop: a slot holds the adapter object itself, and one reloaded under its name is another
        object (`ensure` copies it in again)."""

    def eps(self, x, t, text, w_emb, row_sets: list[AdapterSet]) -> torch.Tensor:
        """eps (rows, C, h, w) of one UNet call whose rows use `row_sets`: padded to the bucket, run, cut."""
        rows = x.shape[0]
        size = bucket_of(rows)
        self.ensure(row_sets)
        row_coef, proj_coef = self.coefficients(row_sets, size)
        pad = (lambda v: torch.cat([v, v.new_zeros(size - rows, *v.shape[1:])])) if size > rows else (lambda v: v)
        t = t.to(torch.float32)  # DDIM's are integers, Euler's floats: one dtype, one graph
        return self.run(pad(x), pad(t), pad(text), pad(w_emb), row_coef, proj_coef)[:rows]

    @torch.no_grad()
    def warm(self, latent: tuple[int, ...], text: tuple[int, int], device, dtype) -> None:
        """Compile every bucket for one latent shape (C, h, w) and text shape (T, D): before traffic."""
        for size in BUCKETS:
            zeros = torch.zeros(size, *latent, device=device, dtype=dtype)
            self.eps(zeros, torch.zeros(size, device=device),
                      torch.zeros(size, *text, device=device, dtype=dtype),
                      torch.zeros(size, self.unet.time_embedding.cond_proj.weight.shape[2], device=device,
                                  dtype=dtype), [()] * size)
