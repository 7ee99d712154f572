"""Adapters are validated on load: every way an adapter folder can be broken is an AdapterError naming the file and
the problem (never an UnicodeDecodeError or IndexError that stops the server, nor a rank of 0 that divides by zero
at every request); the registry is left as it was."""

import shutil

import pytest
import torch

from distillery.adapters import AdapterError, AdapterMeta
from distillery.paths import EMBEDDED_ADAPTERS

from .bad_adapters import BAD, MORE_BAD, SERVER_REFUSED, TO_Q, write_bad

READER_REFUSED = [name for name in {**BAD, **MORE_BAD} if name not in SERVER_REFUSED]


@pytest.mark.parametrize("name", READER_REFUSED)
def test_a_broken_adapter_is_refused_naming_the_file_and_the_problem(served, tmp_path, name):
    _, registry = served
    folder = write_bad(tmp_path, name)
    known = dict(registry.known)
    with pytest.raises(AdapterError) as refused:
        registry.load(name, folder)
    message = str(refused.value)
    assert str(folder) in message, message
    assert {**BAD, **MORE_BAD}[name][2] in message, message
    assert registry.known == known  # nothing registered


def test_tensor_problems_name_the_layer(served, tmp_path):
    _, registry = served
    for name in ("b-1d", "rank-mismatch", "nan-weights", "a-too-wide"):
        with pytest.raises(AdapterError, match=f"layer '{TO_Q.removeprefix('unet.')}'"):
            registry.load(name, write_bad(tmp_path, name))


def test_the_files_own_problems_are_refused_by_the_metadata_reader_alone(tmp_path):
    """The JSON-level refusals need no model: AdapterMeta.read is what the distillers' students read too."""
    for name in ("non-utf8", "invalid-json", "rank-0", "extra-field", "mistyped", "infinite-alpha", "w-range"):
        with pytest.raises(AdapterError, match="adapter.json"):
            AdapterMeta.read(write_bad(tmp_path, name))


def test_metadata_made_in_code_is_validated_too():
    with pytest.raises(ValueError, match="rank"):
        AdapterMeta(kind="style", base_fingerprint="x", rank=0, alpha=1.0, target_modules=[])
    meta = AdapterMeta(kind="style", base_fingerprint="x", rank=4, alpha=4, target_modules=[], steps=(1, 2))
    assert (meta.alpha, meta.steps) == (4.0, [1, 2])  # lax in code: what the distillers pass is converted


def test_an_unexpected_error_reading_one_adapter_becomes_an_adapter_error(served, tmp_path, monkeypatch):
    """Whatever a library raises while one adapter is read (here: safetensors' reader) names that adapter's path."""
    _, registry = served
    good = shutil.copytree(EMBEDDED_ADAPTERS / "stripes-toy", tmp_path / "good")

    def broken(*args, **kwargs):
        raise KeyError("a library's own failure")

    monkeypatch.setattr("distillery.adapters.files.load_file", broken)
    with pytest.raises(AdapterError, match=f"{good}: cannot be read as an adapter: KeyError"):
        registry.load("good", good)


def test_a_refused_load_leaves_what_is_served_unchanged(served, tmp_path):
    model, registry = served
    before = {name: p.clone() for name, p in model.unet.named_parameters()}
    for name in ("rank-mismatch", "nan-weights"):
        with pytest.raises(AdapterError):
            registry.load(name, write_bad(tmp_path, name))
    assert all(torch.equal(p, before[name]) for name, p in model.unet.named_parameters())
