"""The LoRA op's per-call metadata is built once per UNet call (row pattern) and reused by every layer.

The registry's real serving layers on the toy UNet, the Triton kernels forced (interpreter on CPU): a
whole toy UNet call takes ~7 s in the interpreter, so the test runs four of its layers per call (a Linear
on tokens, one on encoder states, a wide one, a 1 x 1 conv) as the UNet would, inside `registry.active`.
"""

from functools import cached_property

import pytest
import torch

from distillery.adapters import AdapterRegistry
from distillery.kernels import LoRAWeights, RowMapping, lora_triton
from distillery.model import DiffusionModel
from distillery.paths import EMBEDDED_MODEL
from distillery.testing.synthetic_adapters import write_random_adapter

BLOCK = "mid_block.attentions.0."
LAYERS = [BLOCK + "proj_in", BLOCK + "transformer_blocks.0.attn1.to_q", BLOCK + "transformer_blocks.0.attn2.to_k",
          BLOCK + "transformer_blocks.0.ff.net.2"]
TOKENS = 4  # a 2 x 2 latent's tokens, and 4 text tokens
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU the kernels run in Triton's interpreter


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = DiffusionModel.from_pretrained(EMBEDDED_MODEL, device=DEVICE)
    registry = AdapterRegistry(model, merged_budget_bytes=0)  # per-row LoRA everywhere: the kernel's path
    tmp = tmp_path_factory.mktemp("adapters")
    targets = ["to_q", "to_k", "ff.net.2", "proj_in"]
    a, b = (registry.load(name, write_random_adapter(tmp / name, model.unet, model.fingerprint, rank=rank,
                                                     seed=seed, targets=targets))
            for name, rank, seed in (("a", 4, 1), ("b", 8, 2)))
    return model, registry, ((a, 1.0),), ((b, 0.5),)


def _inputs(model, rows: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rows)
    shapes = {}
    for name in LAYERS:
        layer = model.unet.get_submodule(name)
        if isinstance(layer.base, torch.nn.Conv2d):
            shapes[name] = (rows, layer.base.in_channels, 2, 2)  # (n, C, H, W)
        else:
            shapes[name] = (rows, TOKENS, layer.in_features)  # (rows, tokens, K)
    return {name: torch.randn(shape, generator=g).to(DEVICE) for name, shape in shapes.items()}


def _counting(monkeypatch, counts):
    """Count RowMapping builds, padded-weight builds, and the fused kernel's calls; the convenience wrapper (which
    builds metadata per call) must not run at all."""
    init = RowMapping.__init__

    def counted_init(self, *args, **kwargs):
        counts["mappings"] += 1
        init(self, *args, **kwargs)

    padded = LoRAWeights.padded.func

    def counted_padded(self):
        counts["padded"] += 1
        return padded(self)

    prop = cached_property(counted_padded)
    prop.__set_name__(LoRAWeights, "padded")
    fused = lora_triton.lora_linear_fused

    def counted_fused(*args):
        counts["fused"] += 1
        return fused(*args)

    def wrapper(*args):
        raise AssertionError("the serving path must not build per-call metadata per layer")

    monkeypatch.setattr(RowMapping, "__init__", counted_init)
    monkeypatch.setattr(LoRAWeights, "padded", prop)
    monkeypatch.setattr(lora_triton, "lora_linear_fused", counted_fused)
    monkeypatch.setattr(lora_triton, "lora_linear_triton", wrapper)


def test_metadata_is_built_once_per_unet_call_not_per_layer(served, monkeypatch):
    model, registry, a, b = served
    counts = dict.fromkeys(("mappings", "padded", "fused"), 0)
    _counting(monkeypatch, counts)
    registry.forget_cached()  # nothing cached from elsewhere
    calls = [[a, a, (), b], [a, a, (), b], [b, a]]  # a call, the same row pattern again (cached), another
    buffers = set()
    with torch.no_grad():
        for sets in calls:
            inputs = _inputs(model, len(sets))
            with registry.active(sets):
                for name in LAYERS:
                    monkeypatch.setenv("DISTILLERY_LORA_BACKEND", "triton")
                    y = model.unet.get_submodule(name)(inputs[name])
                    monkeypatch.setenv("DISTILLERY_LORA_BACKEND", "torch")  # the torch path: the reference
                    torch.testing.assert_close(y, model.unet.get_submodule(name)(inputs[name]), rtol=1e-4, atol=1e-4)
                    buffers.add(registry.backend.workspace.buffer.data_ptr())
    assert counts["fused"] == len(LAYERS) * len(calls)
    assert counts["mappings"] == 2  # one per distinct row pattern, not one per layer (nor per call of a cached one)
    assert counts["padded"] == len(LAYERS) * 2  # once per layer per composition ([a, b] and [b, a])
    assert registry.backend.workspace.grown == 1 and len(buffers) == 1  # one shrink buffer for every layer and call


@pytest.mark.parametrize("pattern", ["aa", "a-bb"])  # one set (a loop over segments), several (all at once)
def test_torch_path_reads_nothing_back_per_layer(served, monkeypatch, pattern):
    """Scales as host floats, segments on the host: no .tolist() / .item() (a GPU sync each on CUDA) per layer."""
    model, registry, a, b = served
    monkeypatch.setenv("DISTILLERY_LORA_BACKEND", "torch")
    sets = [{"a": a, "b": b, "-": ()}[c] for c in pattern]
    inputs = _inputs(model, len(sets))
    with torch.no_grad(), registry.active(sets):
        expected = {name: model.unet.get_submodule(name)(x) for name, x in inputs.items()}

        def no_read_back(*args):
            raise AssertionError("a read back to the host in a layer call")

        monkeypatch.setattr(torch.Tensor, "tolist", no_read_back)
        monkeypatch.setattr(torch.Tensor, "item", no_read_back)
        for name, x in inputs.items():
            assert torch.equal(model.unet.get_submodule(name)(x), expected[name])
