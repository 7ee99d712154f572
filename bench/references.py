"""One home for the quality benchmarks' shared work: evaluation renders and the FID reference, computed once.

toy_quality, guidance_quality, steps_quality, style and prune judge the same sets of images: the CFG teacher
at 25 steps at the model's default w for the evaluation prompts (1000 of them in steps_quality and prune,
300 in style, 200 for the w sweeps), the distilled adapters' samplers, and the FID reference with its floor
`fid_real`. Each benchmark ran in its own process and rendered its own; here the first one to need a set
renders it and the others reuse it (or extend it).

What is kept, keyed by everything the result depends on:
- renders: the FINAL LATENTS of `eval_images`' images (seeds 0..n-1), keyed by the model's content (its
  UNet fingerprint and a hash of every weight of UNet, VAE, text encoder, and its scheduler config),
  w, steps, prompt combinations, scheduler, rescale and each adapter's name, weight, metadata and weights;
  with the (first seed, images) of each `generate` call that rendered them. Latents, not images: the VAE's
  output bits depend on how many latents one decode call holds (measured on this CPU), so each benchmark
  decodes in its own chunks, exactly as `eval_images` would. A row's latents can depend on its call too
  (measured here: the last image of calls of 1, 3 and 5 CFG images differed), so latents rendered in other calls than
  a benchmark's own serve it only where `_Renders.rows_agree` finds, on the sampler itself, that every call
  size involved gives each row the bits of a longer call; otherwise the benchmark renders its own. A served
  model without adapters and the plain model are one key: the serving layers leave such rows bit-identical
  (distillery/adapters/layers.py; measured too).
- FID: the reference renders' feature statistics and the floor, keyed by n, combinations, seeds, the
  oracle file's hash and the feature batch.

Where: in memory for the process, and on disk in the folder $DISTILLERY_BENCH_REFERENCES names. `python -m
bench` with several benchmarks makes a fresh folder under .bench/ for its one run (its `run_scope`), hands it
to each benchmark's process and deletes it at the end: no entry outlives the run, so no change of code or
model between runs can meet an old entry. `make bench BENCH=x` alone keeps its work in memory only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from bench import REFERENCES_ENV
from distillery.distill.evaluation.alignment import alignment_of
from distillery.distill.evaluation.fid import FLOOR_SEED, REFERENCE_SEED, FidReference
from distillery.distill.toy.data import TRAIN_COMBOS, eval_prompts
from distillery.model import DiffusionModel
from distillery.paths import ORACLE_FILE
from distillery.sampling.pipeline import generate
from distillery.sampling.plan import distilled_adapter

FORMAT = 2  # of the entries: bumped when what they hold changes
FID_BATCH = 500  # FidReference's default feature batch: the statistics' bits depend on it
PROBE_MARGIN = 4  # images the row check's reference call has beyond the longest call it checks
FID_REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")  # torchmetrics'

_memory: dict[str, object] = {}  # key digest -> entry, this process
_identities: dict[int, tuple[object, str]] = {}  # id(model or adapter) -> (it, its content key)


def _address(key: dict) -> tuple[str, str]:
    """The key as stored (with the entries' FORMAT: an entry of another layout is another key) and its digest."""
    text = json.dumps({**key, "format": FORMAT}, sort_keys=True)
    return text, hashlib.sha256(text.encode()).hexdigest()[:32]


def _get(key: dict):
    text, digest = _address(key)
    if digest in _memory:
        return _memory[digest]
    folder = os.environ.get(REFERENCES_ENV)
    path = Path(folder) / f"{digest}.pt" if folder else None
    if path is None or not path.exists():
        return None
    stored = torch.load(path, weights_only=True)
    if stored["key"] != text:  # a digest collision would serve another set
        return None
    _memory[digest] = stored["entry"]
    return stored["entry"]


def _put(key: dict, entry) -> None:
    text, digest = _address(key)
    _memory[digest] = entry
    folder = os.environ.get(REFERENCES_ENV)
    if folder:  # written whole, then renamed: a reader never sees half a file
        tmp = Path(folder) / f"{digest}.{os.getpid()}.tmp"
        torch.save({"key": text, "entry": entry}, tmp)
        os.replace(tmp, Path(folder) / f"{digest}.pt")


def _tensors_hash(h, named) -> None:
    for name, t in named:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{t.numel()}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())


def _identity(obj, compute) -> str:
    """The content key of a model or adapter, computed once per object (hashing every weight costs time)."""
    known = _identities.get(id(obj))
    if known is None or known[0] is not obj:
        known = _identities[id(obj)] = (obj, compute(obj))
    return known[1]


def model_key(model: DiffusionModel) -> str:
    """Fingerprint + every weight: the fingerprint samples a few weights; two checkpoints must never meet."""
    def compute(m: DiffusionModel) -> str:
        h = hashlib.sha256(m.fingerprint.encode())
        h.update(json.dumps(m.scheduler_config, sort_keys=True, default=str).encode())
        for part in m.modules():  # UNet, VAE, the text encoder(s)
            # serving layers hold each wrapped module as `.base`: the plain and the served model hash alike
            _tensors_hash(h, ((name.replace(".base.", "."), t) for name, t in sorted(part.state_dict().items())))
        return f"{m.fingerprint}-{h.hexdigest()[:16]}"
    return _identity(model, compute)


def _adapter_key(adapter) -> str:
    def compute(a) -> str:
        h = hashlib.sha256(repr(a.meta).encode())
        _tensors_hash(h, ((f"{layer}.{i}", t) for layer, ab in sorted(a.layers.items()) for i, t in enumerate(ab)))
        if a.projection is not None:
            _tensors_hash(h, [("projection", a.projection)])
        return f"{a.name}-{h.hexdigest()[:16]}"
    return _identity(adapter, compute)


@contextlib.contextmanager
def _decoded(model: DiffusionModel):
    """The latents `generate` decodes, captured on their way into this model's `decode` (an instance attribute
    over the method, for this call only): `generate` stays the one sampling loop."""
    seen: list[torch.Tensor] = []
    decode = model.decode

    def capture(latents: torch.Tensor):
        seen.append(latents.clone())
        return decode(latents)

    model.decode = capture
    try:
        yield seen
    finally:
        del model.decode


@dataclass
class _Renders:
    """One evaluation set's settings, as `eval_images` takes them."""

    model: DiffusionModel
    registry: object
    guidance: float
    steps: int
    combos: tuple
    scheduler: str | None
    rescale: float
    adapters: tuple

    def key(self) -> dict:
        """What the set's latents depend on, but for n and the chunks they were rendered in."""
        return {"what": "eval_latents", "model": model_key(self.model), "guidance": self.guidance,
                "steps": self.steps, "combos": [list(c) for c in self.combos], "scheduler": self.scheduler,
                "rescale": self.rescale, "adapters": [[_adapter_key(a), float(w)] for a, w in self.adapters]}

    def render(self, prompts: list, first_seed: int, steps: int | None = None) -> tuple[list, torch.Tensor]:
        """One `generate` call (one chunk of `eval_images`): its images and their final latents (n, C, h, w)."""
        seeds = list(range(first_seed, first_seed + len(prompts)))
        with _decoded(self.model) as seen:
            images = generate(self.model, [p for p, _, _ in prompts], seeds, self.guidance, steps or self.steps,
                              scheduler=self.scheduler, rescale=self.rescale, adapters=self.adapters,
                              registry=self.registry).images
        if len(seen) != 1 or len(seen[0]) != len(images):  # cached latents are decoded a chunk at a time
            raise RuntimeError(f"generate decoded {len(images)} images in {len(seen)} calls, not one: "
                               "bench/references.py's decoding of cached latents must follow it")
        return images, seen[0]

    def rows_agree(self, sizes: set[int], budget: int) -> bool:
        """Does every row of a few-step render (`probe_steps`) in a call of each of `sizes` images come out with the bits it has
        in a longer call? Then a row's latents do not depend on the call that rendered it (every step runs the
        same operations on the same shapes). Measured on this CPU: calls of 1, 3 and 5 CFG images render their
        last image's rows otherwise, hence this check, and a reference call a few images longer than any
        compared, so that no compared row sits at its end. Once per set and sizes; not at all (False) where
        it would render more than `budget` image-steps, what reusing would save."""
        check = {"check": "rows_agree", "of": self.key(), "sizes": sorted(sizes)}
        known = _get(check)
        if known is None:
            steps = self.probe_steps()
            if (sum(sizes) + max(sizes) + PROBE_MARGIN) * steps >= budget:
                return False
            prompts = eval_prompts(max(sizes) + PROBE_MARGIN, self.combos)
            reference = self.render(prompts, 0, steps)[1]
            known = all(torch.equal(self.render(prompts[:k], 0, steps)[1], reference[:k]) for k in sorted(sizes))
            _put(check, known)
        return known

    def probe_steps(self) -> int:
        """The fewest steps the set samples with: one, or a step-distilled adapter's fewest (the plan refuses
        others: a progressive adapter distilled for 4 steps samples only 4)."""
        distilled = distilled_adapter(self.adapters)
        return min(distilled.meta.steps) if distilled is not None and distilled.meta.steps else 1


def _chunks(first: int, n: int, batch: int) -> list[tuple[int, int]]:
    """(first seed, images) of each `generate` call rendering seeds first..n-1, `batch` at a time."""
    return [(start, min(batch, n - start)) for start in range(first, n, batch)]


def eval_images(model: DiffusionModel, n: int = 200, guidance: float = 0.0, steps: int = 25, combos=TRAIN_COMBOS,
                batch: int = 50, scheduler: str | None = None, rescale: float = 0.0, adapters=(), registry=None,
                reuse: bool = True) -> tuple[list[Image.Image], list]:
    """distillery's `eval_images`, the same images to the bit, rendered once per run: the first n of a set
    rendered before (a shorter one is extended), or rendered now and kept. `reuse=False`: render all now (a
    benchmark that times its renders), and keep them for the others."""
    prompts = eval_prompts(n, combos)
    renders = _Renders(model, registry, float(guidance), steps, tuple(combos), scheduler, float(rescale),
                       tuple(adapters))
    key = renders.key()
    mine = _chunks(0, n, batch)  # the calls `eval_images` makes
    known = _get(key)
    have = 0  # rows taken from `known`
    if reuse and known is not None:
        have = min(len(known["latents"]), n)
        theirs = [tuple(c) for c in known["chunks"] if c[0] < have] + _chunks(have, n, batch)
        if theirs != mine and not renders.rows_agree({k for _, k in theirs + mine}, budget=have * steps):
            have = 0
    if have == 0:  # rendered whole, in this call's chunks: `eval_images` exactly, images included
        rendered = [renders.render(prompts[start:start + k], start) for start, k in mine]
        _keep(key, known, torch.cat([r[1] for r in rendered]), mine)
        return [image for r in rendered for image in r[0]], prompts
    extra = _chunks(have, n, batch)
    latents = torch.cat([known["latents"][:have]] + [renders.render(prompts[start:start + k], start)[1]
                                                     for start, k in extra])
    _keep(key, known, latents, [tuple(c) for c in known["chunks"] if c[0] < have] + extra)
    images = []
    for start, k in mine:  # decoded in this call's chunks, as each `generate` call decodes its own
        images += model.decode(latents[start:start + k])
    return images, prompts


def _keep(key: dict, known, latents: torch.Tensor, chunks: list[tuple[int, int]]) -> None:
    if known is None or len(known["latents"]) < len(latents):  # a larger set stays: it serves more
        _put(key, {"latents": latents, "chunks": [list(c) for c in chunks]})


def alignment(model: DiffusionModel, n: int = 200, **kwargs) -> float:
    return alignment_of(*eval_images(model, n, **kwargs))


def fid_reference(n: int, combos=TRAIN_COMBOS) -> tuple[FidReference, float]:
    """`FidReference.of_renders(n)` and its floor `fid_real`: the reference's feature statistics and the
    floor are computed once per run; a later benchmark gets a FidReference holding the same statistics."""
    key = {"what": "fid_reference", "n": n, "combos": [list(c) for c in combos], "reference_seed": REFERENCE_SEED,
           "floor_seed": FLOOR_SEED, "batch": FID_BATCH, "oracle": _file_hash(ORACLE_FILE)}
    known = _get(key)
    if known is None:
        reference = FidReference.of_renders(n, combos)
        floor = reference.floor(n, combos)
        _put(key, {"real": {name: getattr(reference.metric, name).clone() for name in FID_REAL_STATES},
                   "floor": floor})
        return reference, floor
    reference = FidReference([], batch=FID_BATCH)  # the feature extractor; its reference statistics from the entry
    for name, value in known["real"].items():
        setattr(reference.metric, name, value.clone())
    return reference, known["floor"]


def _file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
