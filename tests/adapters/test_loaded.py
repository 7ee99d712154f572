"""A plain LoRA .safetensors file (kohya / A1111 layout, no adapter.json) served as a style adapter: its output
matches peft's with the same weights, per-layer ranks and alphas included; what it cannot be is refused."""

import logging
import shutil

import pytest
import torch
from safetensors.torch import save_file

from distillery.adapters import LORA_FILE, AdapterError
from distillery.model import DiffusionModel
from distillery.paths import EMBEDDED_MODEL
from distillery.serving.engine import Engine
from distillery.testing.synthetic_adapters import write_random_adapter

from .conftest import RANK_PATTERN


def _inputs(model, rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 4, 16, 16, generator=g), torch.randint(0, 1000, (rows,), generator=g),
            torch.randn(rows, model.tokenizer.model_max_length, model.unet.config.cross_attention_dim, generator=g))


def _served(model, registry, row_sets, inputs):
    x, t, text = inputs
    with torch.no_grad(), registry.active(row_sets):
        return model.unet(x, t, encoder_hidden_states=text).sample  # (rows, C, h, w)


@pytest.mark.parametrize("merged_bytes", [0, 1 << 30], ids=["per-row", "merged"])
def test_kohya_file_serves_what_peft_computes(served, peft_unet, kohya_lora, tmp_path, merged_bytes):
    model, registry = served
    path = tmp_path / "kohya-style.safetensors"
    save_file(kohya_lora, str(path))
    adapter = registry.load(f"kohya-{merged_bytes}", path)
    assert (adapter.meta.kind, adapter.meta.rank, adapter.scale) == ("style", max(4, *RANK_PATTERN.values()), 1.0)
    assert adapter.meta.base_fingerprint == model.fingerprint and not adapter.single_eval

    registry.merged_budget_bytes = merged_bytes
    inputs = _inputs(model, 2)
    out = _served(model, registry, [((adapter, 1.0),), ()], inputs)  # beside a base row
    base = _served(model, registry, [(), ()], inputs)
    x, t, text = inputs
    with torch.no_grad():
        expected = peft_unet(x[:1], t[:1], encoder_hidden_states=text[:1]).sample
    scale = expected.abs().max()
    torch.testing.assert_close(out[:1], expected, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(out[1:], base[1:], rtol=0, atol=1e-6 * scale)
    assert (out[:1] - base[:1]).abs().max() > 0.05 * scale  # the LoRA really changes the output


def test_a_diffusers_format_file_equals_its_folder(served, tmp_path):
    """The file a distiller writes, taken out of its folder: the same layers at scale 1."""
    model, registry = served
    folder = write_random_adapter(tmp_path / "style", model.unet, model.fingerprint, rank=4, seed=3)
    shutil.copy(folder / LORA_FILE, tmp_path / "plain.safetensors")
    from_folder, from_file = registry.load("folder", folder), registry.load("file", tmp_path / "plain.safetensors")
    assert from_folder.scale == from_file.scale == 1.0 and from_file.layers.keys() == from_folder.layers.keys()
    assert all(torch.equal(x, y) for k in from_file.layers for x, y in zip(from_file.layers[k], from_folder.layers[k]))


def _refused(registry, tmp_path, lora, name="bad") -> str:
    path = tmp_path / f"{name}.safetensors"
    save_file(lora, str(path))
    known = dict(registry.known)
    with pytest.raises(AdapterError) as info:
        registry.load(name, path)
    assert registry.known == known  # nothing loaded
    assert str(path) in str(info.value)
    return str(info.value)


TO_Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


def test_unservable_files_are_refused_with_the_reason(served, kohya_lora, tmp_path):
    _, registry = served
    te = {f"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_{part}.weight": torch.ones(2, 2)
          for part in ("down", "up")}
    assert "LoRA on 1 text-encoder layers" in _refused(registry, tmp_path, {**kohya_lora, **te})
    assert "DoRA" in _refused(registry, tmp_path, {**kohya_lora, f"{TO_Q}.dora_scale": torch.ones(1, 32)})
    assert f"{TO_Q}.hada_w1_a" in _refused(registry, tmp_path, {**kohya_lora, f"{TO_Q}.hada_w1_a": torch.ones(4, 4)})


def test_layers_the_unet_lacks_or_shapes_it_does_not_have_are_refused(served, kohya_lora, tmp_path):
    _, registry = served
    missing = {"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.ones(2, 64, 1, 1),
               "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.ones(64, 2, 1, 1)}
    message = _refused(registry, tmp_path, {**kohya_lora, **missing})
    assert "'down_blocks.7.attentions.0.proj_in' does not exist in the base UNet" in message
    wider = {**kohya_lora, f"{TO_Q}.lora_down.weight": torch.ones(4, 128)}  # an SD-1.5-sized layer on the toy
    assert "layer 'down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q' has A (4, 128)" in \
        _refused(registry, tmp_path, wider)


def test_engine_registers_lora_files_in_the_root(kohya_lora, tmp_path, caplog):
    engine = Engine(DiffusionModel.from_pretrained(EMBEDDED_MODEL))
    model = engine.model
    write_random_adapter(tmp_path / "folder-style", model.unet, model.fingerprint, rank=4)
    save_file(kohya_lora, str(tmp_path / "anime.safetensors"))
    save_file({**kohya_lora, f"{TO_Q}.lokr_w1": torch.ones(2, 2)}, str(tmp_path / "lokr.safetensors"))
    write_random_adapter(tmp_path / "pruned-base-style", model.unet, "0123456789abcdef", rank=4)
    with caplog.at_level(logging.INFO, logger="distillery.engine"):
        assert engine.load_adapters_from(tmp_path) == ["anime", "folder-style"]
    assert engine.registry.get("anime").meta.kind == "style"
    levels = {r.getMessage().split()[1].rsplit("/", 1)[-1]: r.levelname for r in caplog.records}
    # a broken file warns; an adapter of another base, as the shipped root holds, is skipped quietly
    assert levels == {"lokr.safetensors": "WARNING", "pruned-base-style": "INFO"}
    assert "lokr_w1" in caplog.text and "trained on base model 0123456789abcdef" in caplog.text
