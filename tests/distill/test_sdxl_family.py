"""The distillers on an SDXL-family base: the training batches carry its conditioning (both encoders' states,
pooled embeds, the training size's ids, zeros for the unconditional branch), and what they write serves."""

import numpy as np
import pytest

from distillery.adapters import AdapterRegistry
from distillery.distill.methods.consistency import ConsistencyDistillConfig, distill_consistency
from distillery.distill.methods.guidance import GuidanceDistillConfig, distill_guidance
from distillery.distill.methods.style import StyleTrainConfig, train_style
from distillery.model import DiffusionModel
from distillery.sampling.pipeline import generate

METHODS = {  # two training steps each: the mechanics, not the quality
    "guidance": (GuidanceDistillConfig, distill_guidance, "toy:16", "single-eval", 2, 6),
    "consistency": (ConsistencyDistillConfig, distill_consistency, "toy:16", "single-eval", 1, 4),
    "style": (StyleTrainConfig, train_style, "toy-stripes:16", "cfg", 2, 2),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_distiller_trains_on_an_sdxl_base_and_its_adapter_serves(method, random_toy_xl_folder, tmp_path):
    config, run, data, mode, w, steps = METHODS[method]
    cfg = config(model=str(random_toy_xl_folder), data=data, batch=4, warmup=0, steps=2, checkpoint_every=1,
                 init_from="", out=str(tmp_path / method), work=str(tmp_path / "work"))
    folder = run(cfg)
    model = DiffusionModel.from_pretrained(random_toy_xl_folder)
    registry = AdapterRegistry(model)
    adapter = registry.load(method, folder)
    out = generate(model, ["a red circle"], [0], w, steps, adapters=((adapter, 1.0),), registry=registry,
                   height=48, width=32)
    assert out.mode == mode and out.images[0].size == (32, 48)
    assert np.isfinite(np.asarray(out.images[0], dtype=float)).all() and np.asarray(out.images[0]).std() > 0
