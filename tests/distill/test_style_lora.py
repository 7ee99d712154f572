"""The style LoRA trains on the styled toy data like any style LoRA, and loads as a plain (style) adapter."""

import json

from distillery.adapters import AdapterRegistry
from distillery.distill.methods.style import StyleTrainConfig, train_style
from distillery.distill.toy.data import sample
from distillery.distill.training.image_captions import image_caption_loader
from distillery.model import DiffusionModel
from distillery.paths import EMBEDDED_MODEL


def test_the_styled_data_is_the_plain_data_with_stripes():
    plain, styled = sample(5), sample(5, stripes=True)
    assert plain.caption == styled.caption and plain.image.tobytes() != styled.image.tobytes()
    batch = next(iter(image_caption_loader("toy-stripes:8", 32, 8)))
    assert batch["pixel_values"].shape == (8, 3, 32, 32)


def test_style_lora_trains_and_loads_as_a_style_adapter(tmp_path):
    out = train_style(StyleTrainConfig(model=str(EMBEDDED_MODEL), data="toy-stripes:8", batch=4, steps=1, warmup=0,
                                       out=str(tmp_path / "style"), work=str(tmp_path / "work")))
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["kind"] == "style" and "conv1" in meta["target_modules"] and meta["steps"] == []
    model = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    adapter = AdapterRegistry(model).load("style", out)
    assert not adapter.single_eval and adapter.projection is None
    assert any(layer.endswith("conv1") for layer in adapter.layers)  # LoRA on 3x3 convolutions, served
