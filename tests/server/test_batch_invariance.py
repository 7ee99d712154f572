"""One UNet call holds rows of many requests: each row's output must be bit-identical to the
same row run alone, whatever the other rows' timesteps, w and adapter sets (including style
LoRAs on 1 x 1 and 3 x 3 convolutions, composed sets and weights other than 1)."""

import random

import pytest
import torch

from distill.synthetic_adapters import write_random_adapter
from server.config import EMBEDDED_ADAPTERS, EMBEDDED_MODEL
from server.guidance import guidance_embedding
from server.model import DiffusionModel
from server.registry import AdapterRegistry

CONV_TARGETS = ["to_q", "to_v", "conv1", "conv2", "conv_shortcut", "proj_in", "proj_out", "time_emb_proj",
                "downsamplers.0.conv", "upsamplers.0.conv"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    registry = AdapterRegistry.of(model)
    tmp = tmp_path_factory.mktemp("adapters")
    g = registry.load("g", EMBEDDED_ADAPTERS / "guidance-toy")
    s1 = registry.load("s1", write_random_adapter(tmp / "s1", model.unet, model.fingerprint, rank=8, seed=1))
    s2 = registry.load("s2", write_random_adapter(tmp / "s2", model.unet, model.fingerprint, rank=4, seed=2,
                                                  targets=CONV_TARGETS))
    assert any(a.dim() == 4 for a, _ in s2.layers.values())  # 3 x 3 conv LoRA present
    sets = [(), ((g, 1.0),), ((s1, 0.7),), ((g, 1.0), (s1, 0.5)), ((s2, 1.0),), ((g, 1.0), (s2, 0.8), (s1, 0.3))]
    return model, registry, sets


def _row(model, sets, seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens, dim = model.tokenizer.model_max_length, model.unet.config.cross_attention_dim
    return (torch.randn(4, 16, 16, generator=g), torch.randint(0, 1000, (), generator=g),
            torch.randn(tokens, dim, generator=g), torch.rand((), generator=g) * 5, sets[seed % len(sets)])


def _call(model, registry, rows):
    x, t, text, w = (torch.stack([r[i] for r in rows]) for i in range(4))
    with torch.no_grad(), registry.active([r[4] for r in rows]):
        return model.unet(x, t, encoder_hidden_states=text, timestep_cond=guidance_embedding(w)).sample


@pytest.mark.parametrize("merged_bytes", [0, 64 << 20, 1], ids=["per-row", "merged", "merged-evicting"])
def test_every_row_is_bit_identical_to_the_row_alone(served, merged_bytes):
    """Per-row LoRA, merged weights, and merged weights evicted and re-merged between calls."""
    model, registry, sets = served
    registry.merged_budget_bytes = merged_bytes
    rng = random.Random(0)
    for probe_seed in range(len(sets)):
        probe = _row(model, sets, probe_seed)
        alone = _call(model, registry, [probe])[0]
        for _ in range(3):
            others = [_row(model, sets, rng.randrange(100, 10_000)) for _ in range(rng.randrange(1, 10))]
            pos = rng.randrange(len(others) + 1)
            rows = others[:pos] + [probe] + others[pos:]
            out = _call(model, registry, rows)[pos]
            assert torch.equal(out, alone), (probe_seed, len(rows), pos, (out - alone).abs().max().item())
    registry.merged_budget_bytes = 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_conv_lora_changes_the_output_and_matches_peft(served, tmp_path, backend, monkeypatch):
    """The style LoRA on convolutions is really applied, as peft applies it: 1 x 1 convolutions
    through the LoRA op (the Triton kernel, in its interpreter here), 3 x 3 through the torch reference."""
    from safetensors.torch import load_file

    monkeypatch.setenv("DISTILLERY_LORA_BACKEND", backend)
    model, registry, sets = served
    probe = _row(model, sets, 4)  # sets[4]: s2 alone at weight 1
    base = _call(model, registry, [probe[:4] + ((),)])[0]
    served_out = _call(model, registry, [probe])[0]
    assert not torch.allclose(base, served_out, atol=1e-4)

    reference = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    folder = write_random_adapter(tmp_path / "s2", reference.unet, reference.fingerprint, rank=4, seed=2,
                                  targets=CONV_TARGETS)
    reference.unet.load_lora_adapter(load_file(str(folder / "pytorch_lora_weights.safetensors")), prefix="unet",
                                     adapter_name="s2")
    x, t, text, _ = probe[:4]
    with torch.no_grad():
        expected = reference.unet(x[None], t[None], encoder_hidden_states=text[None]).sample[0]
    torch.testing.assert_close(served_out, expected, rtol=1e-4, atol=1e-4)
