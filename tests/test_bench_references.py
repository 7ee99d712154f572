"""bench/references.py, the quality benchmarks' shared renders and FID reference: what it hands a benchmark
is bit for bit what that benchmark would have rendered itself, whoever rendered it first (another process,
another chunk size, the plain or the served model, a shorter set since extended); its folder lives one run."""

import numpy as np
import pytest

from bench import REFERENCES_ENV, references
from bench.__main__ import run_scope
from bench.common import CONSISTENCY_ADAPTER, toy_with_adapters
from distillery.distill.evaluation.alignment import eval_images
from distillery.distill.evaluation.fid import FidReference
from distillery.distill.toy.data import TRAIN_COMBOS
from distillery.model import DiffusionModel
from distillery.paths import EMBEDDED_MODEL

STEPS = 5  # few steps (the sharing is under test), enough that checking rows costs less than rendering


def pixels(images):
    return np.stack([np.asarray(im) for im in images])


@pytest.fixture
def run_folder(tmp_path, monkeypatch):
    """A run's folder; each "benchmark" below forgets what its process held, as a new process would."""
    monkeypatch.setenv(REFERENCES_ENV, str(tmp_path))
    monkeypatch.setattr(references, "_memory", {})
    return tmp_path


def new_process():
    references._memory.clear()


def test_shared_renders_are_the_renders_each_benchmark_would_make(run_folder, monkeypatch):
    rendered = []  # images rendered at STEPS (the row-independence check renders one step)
    generate = references.generate
    monkeypatch.setattr(references, "generate", lambda model, prompts, *a, **kw: (
        rendered.extend(prompts) if a[2] == STEPS else None) or generate(model, prompts, *a, **kw))
    plain = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    served, registry, adapters = toy_with_adapters([CONSISTENCY_ADAPTER])
    assert references.model_key(plain) == references.model_key(served)  # serving layers change no weight

    def both(model, n, batch, **kw):
        ours, prompts = references.eval_images(model, n, guidance=1.0, steps=STEPS, batch=batch, **kw)
        theirs, their_prompts = eval_images(model, n, guidance=1.0, steps=STEPS, batch=batch, **kw)
        assert prompts == their_prompts
        np.testing.assert_array_equal(pixels(ours), pixels(theirs))

    both(served, 12, 6, registry=registry)  # rendered (served model, 2 calls of 6) and kept on disk
    assert len(rendered) == 12 and len(list(run_folder.glob("*.pt"))) == 1
    new_process()
    both(plain, 8, 8)  # the first 8 of them (plain model, 1 call of 8), decoded in this call's chunks
    assert len(rendered) == 12 + 8 * (not agreed(plain, {6, 8}))
    new_process()
    before = len(rendered)
    both(plain, 24, 8)  # 12 known (calls of 6), 12 more rendered (calls of 8 and 4): the set grows
    assert len(rendered) - before == (12 if agreed(plain, {4, 6, 8}) else 24)
    assert len(references._get(key(plain))["latents"]) == 24
    new_process()
    before = len(rendered)
    first_call = references._get(key(plain))["chunks"][0][1]
    both(plain, 5, 5)  # on the CPU this was written on, a call of 5 CFG images renders its last one otherwise
    assert len(rendered) - before == 5 * (not agreed(plain, {5, first_call}))
    lcm = [(adapters[CONSISTENCY_ADAPTER], 1.0)]
    before = len(rendered)
    both(served, 10, 10, registry=registry, adapters=lcm)  # an adapter's set is its own
    assert len(rendered) - before == 10


def test_a_step_distilled_set_is_checked_at_the_steps_it_samples(run_folder):
    """A progressive adapter samples only its own step count: the row check renders at it, not at one step."""
    served, registry, adapters = toy_with_adapters(["progressive-toy-2"])
    chosen = [(adapters["progressive-toy-2"], 1.0)]
    kwargs = {"guidance": 1.0, "steps": 2, "registry": registry, "adapters": chosen}
    references.eval_images(served, 24, batch=2, **kwargs)
    new_process()
    ours, _ = references.eval_images(served, 24, batch=4, **kwargs)  # known in calls of 2, asked in calls of 4
    theirs, _ = eval_images(served, 24, batch=4, **kwargs)
    np.testing.assert_array_equal(pixels(ours), pixels(theirs))
    assert isinstance(references._get({"check": "rows_agree", "of": references._Renders(
        served, registry, 1.0, 2, tuple(TRAIN_COMBOS), None, 0.0, tuple(chosen)).key(), "sizes": [2, 4]}), bool)


def key(model, adapters=()):
    return references._Renders(model, None, 1.0, STEPS, tuple(TRAIN_COMBOS), None, 0.0, tuple(adapters)).key()


def agreed(model, sizes) -> bool:
    """The row check's answer for these call sizes (what this CPU does), as the run holds it."""
    return references._get({"check": "rows_agree", "of": key(model), "sizes": sorted(sizes)})


def test_another_w_or_model_is_another_set(run_folder):
    plain = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    references.eval_images(plain, 4, guidance=1.0, steps=STEPS, batch=4)
    for kwargs in ({"guidance": 2.0}, {"steps": STEPS + 1}):
        ours, _ = references.eval_images(plain, 4, **{"guidance": 1.0, "steps": STEPS, **kwargs}, batch=4)
        theirs, _ = eval_images(plain, 4, **{"guidance": 1.0, "steps": STEPS, **kwargs}, batch=4)
        np.testing.assert_array_equal(pixels(ours), pixels(theirs))
    other = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    other.unet.conv_out.bias.data += 1e-3  # the fingerprint, taken at load, stays; the content key does not
    assert other.fingerprint == plain.fingerprint and references.model_key(other) != references.model_key(plain)


def test_fid_reference_is_the_same_reference(run_folder):
    reference, floor = references.fid_reference(64)
    new_process()
    restored, restored_floor = references.fid_reference(64)
    fresh = FidReference.of_renders(64)
    images, _ = eval_images(DiffusionModel.from_pretrained(EMBEDDED_MODEL), 16, guidance=1.0, steps=STEPS, batch=16)
    assert floor == restored_floor == fresh.floor(64)
    assert reference.fid(images) == restored.fid(images) == fresh.fid(images)


def test_the_run_folder_goes_with_the_run(tmp_path):
    with run_scope(tmp_path) as env:
        folder = env[REFERENCES_ENV]
        assert folder.startswith(str(tmp_path))
        (tmp_path / folder / "x.pt").write_bytes(b"")
    assert list(tmp_path.iterdir()) == []
