"""DISTILLERY_COMPILE: the server's UNet calls through the slot UNet under torch.compile. The backend here is
`eager` (dynamo's graphs and guards, no code generation: recompilation is decided by the guards alone, and
the test stays fast); `make bench BENCH=compile` times inductor. Nothing raises or compiles on the serving
thread: calls of more rows than the largest bucket run in parts, a new image size runs eagerly while a thread
of its own compiles it."""

import base64
import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torch._dynamo.utils import counters

from distillery.adapters import AdapterRegistry, SlotAdapters
from distillery.adapters.backends.compiled import BUCKETS
from distillery.model import Conditioning, DiffusionModel
from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_MODEL
from distillery.sampling.guidance import EMBEDDING_DIM, guidance_embedding
from distillery.serving.app import create_app
from distillery.serving.config import Settings

REQUESTS = [  # adapters swap in and out of 3 slots; sets, weights, w, n (rows: 1 to 6) vary
    {"prompt": "a red circle", "steps": 3, "n": 3},
    # a size never compiled (it runs eagerly while the compile thread makes its graphs, and the requests after it
    # run the warm graphs meanwhile), 20 rows in one call (16 + 4)
    {"prompt": "a small red circle", "width": 16, "height": 16, "n": 10, "steps": 2},
    {"prompt": "a blue square", "adapters": [{"name": "guidance-toy"}], "guidance": 2.0, "steps": 3},
    {"prompt": "a green triangle", "adapters": [{"name": "lcm-toy"}, {"name": "stripes-toy", "weight": 0.5}]},
    {"prompt": "a red circle", "adapters": [{"name": "progressive-toy-4"}], "guidance": 1.0, "n": 2},
    {"prompt": "a yellow cross", "adapters": [{"name": "stripes-toy", "weight": 1.5}], "steps": 2, "n": 2},
    {"prompt": "a blue circle", "adapters": [{"name": "progressive-toy-2"}, {"name": "stripes-toy"}], "n": 4},
    {"prompt": "a red square", "scheduler": "euler", "steps": 3},
]
SERVING_THREAD = "distillery-torch_0"  # serving/jobs.py's TORCH_THREAD


def _images(client, body):
    resp = client.post("/generate", json={**body, "seed": 5, "response_format": "json"})
    assert resp.status_code == 200, resp.text
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(i["image_png_base64"]))), dtype=int)
            for i in resp.json()["images"]]


@pytest.fixture(scope="module")
def eager_images():
    with TestClient(create_app(Settings())) as client:
        return [_images(client, body) for body in REQUESTS]


def test_compiled_server_serves_the_same_images_without_recompiling(eager_images):
    settings = Settings(compile="eager", compile_slots=3, adapter_backend="compiled")
    with TestClient(create_app(settings)) as client:  # warm-up compiled buckets at the native size
        slots = client.app.state.engine.registry.slots
        graphs, warm = counters["stats"]["unique_graphs"], slots.compiles[SERVING_THREAD]
        compiled = [_images(client, body) for body in REQUESTS]
        assert slots.compiles[SERVING_THREAD] == warm  # nothing compiled on the serving thread after warm-up
        slots.drain()
        # the 16 x 16 images' graphs (buckets 16 and 4), made beside the serving: nothing else recompiled
        assert counters["stats"]["unique_graphs"] - graphs == sum(slots.compiles.values()) - warm == 2
    for got, want in zip(compiled, eager_images):
        assert all(np.abs(g - w).max() <= 2 for g, w in zip(got, want))  # rounding of another summation order


def test_compile_settings_are_validated():
    with pytest.raises(ValueError, match="compile"):
        Settings(compile="max-autotune")
    with pytest.raises(ValueError, match="'compiled' needs DISTILLERY_COMPILE"):
        Settings(adapter_backend="compiled")


NAMES = ["guidance-toy", "lcm-toy", "stripes-toy", "progressive-toy-4"]


def _served(**slot_options):
    """Per-row and the slot UNet (3 slots) on one copy of the model: the slots sit on a module tree of their own."""
    model = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    slots = SlotAdapters(model.unet, EMBEDDING_DIM, slots=3, **{"rank": 16, **slot_options})
    registry = AdapterRegistry(model, merged_budget_bytes=0, slots=slots)
    return registry, slots, {n: registry.load(n, EMBEDDED_ADAPTERS / n) for n in NAMES}


def _inputs(model, rows: int, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, *model.latent_shape(size, size), generator=g),
            torch.randint(1, 1000, (rows,), generator=g),
            Conditioning(torch.randn(rows, 8, model.unet.config.cross_attention_dim, generator=g)),
            guidance_embedding(torch.rand(rows, generator=g) * 5))


def _reference(registry, inputs, row_sets, monkeypatch):
    monkeypatch.setenv("DISTILLERY_LORA_BACKEND", "torch")
    return registry.backends["per_row"].eps(*inputs, row_sets)


def test_more_rows_than_the_largest_bucket_and_adapters_than_slots_run_in_parts(monkeypatch):
    registry, slots, a = _served()
    sets = [((a["guidance-toy"], 1.0),), ((a["lcm-toy"], 1.0), (a["stripes-toy"], 0.5)), (),
            ((a["progressive-toy-4"], 1.0),), ((a["stripes-toy"], 1.5),)]
    row_sets = [chosen for chosen, rows in zip(sets, (5, 4, 4, 6, 12)) for _ in range(rows)]  # 4 adapters, 3 slots
    inputs = _inputs(registry.model, len(row_sets))
    # the 4th adapter starts a part; a part holds at most the largest bucket's 16 rows
    assert [(p.start, p.stop) for p in slots.parts(row_sets)] == [(0, 13), (13, 29), (29, 31)]
    with torch.no_grad():
        got = slots.eps(*inputs, row_sets)
        torch.testing.assert_close(got, _reference(registry, inputs, row_sets, monkeypatch), rtol=1e-4, atol=1e-4)
    assert got.shape[0] == 31 > BUCKETS[-1]


def test_adapters_the_slots_cannot_hold_run_per_row(monkeypatch):
    registry, slots, a = _served(rank=8)  # the toys' rank is 16
    row_sets = [((a["stripes-toy"], 1.0),), ()]
    inputs = _inputs(registry.model, 2)
    with torch.no_grad():
        torch.testing.assert_close(slots.eps(*inputs, row_sets), _reference(registry, inputs, row_sets, monkeypatch),
                                   rtol=0, atol=0)


def test_a_new_size_runs_eagerly_while_its_graph_compiles_beside_the_serving():
    registry, slots, a = _served(backend="eager", background=True)
    row_sets = [((a["stripes-toy"], 1.0),), ((a["guidance-toy"], 1.0),)]
    inputs = _inputs(registry.model, 2, size=16)
    eager_calls = []
    eager = slots.eager
    slots.eager = lambda *args: eager_calls.append(args[0].shape) or eager(*args)
    with torch.no_grad():
        first = slots.eps(*inputs, row_sets)  # no graph for 2 rows of 8 x 8 latents yet: eager, one compile queued
        assert eager_calls == [(2, 4, 8, 8)] and not slots.ready
        slots.drain()
        assert dict(slots.compiles) == {"slot-compile_0": 1} and len(slots.ready) == 1
        again = slots.eps(*inputs, row_sets)
    assert eager_calls == [(2, 4, 8, 8)]  # the second call ran the compiled graph
    torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-5)


def test_the_compile_thread_makes_more_graphs_than_dynamos_default_limit():
    """dynamo's recompile limit (8 graphs) is a per-thread setting: the compile thread must raise it too, or its
    9th graph silently stays eager. A tiny UNet keeps 9 compiles cheap; no adapters, 9 latent sizes."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8,), down_block_types=("DownBlock2D",),
                                up_block_types=("UpBlock2D",), mid_block_type=None, layers_per_block=1,
                                cross_attention_dim=8, norm_num_groups=4)
    slots = SlotAdapters(unet, EMBEDDING_DIM, slots=1, rank=2, backend="eager", background=True)
    sizes = [4 * k for k in range(1, 10)]  # latent sides 4 to 36: 9 graphs on the compile thread
    calls = [(torch.randn(1, 4, s, s), torch.tensor([500]), Conditioning(torch.randn(1, 3, 8)),
              guidance_embedding(torch.ones(1))) for s in sizes]
    eager_calls = []
    eager = slots.eager
    slots.eager = lambda *args: eager_calls.append(args[0].shape[-1]) or eager(*args)
    with torch.no_grad():
        first = [slots.eps(*call, [()]) for call in calls]
        slots.drain()
        assert slots.compiles["slot-compile_0"] == len(sizes) and len(slots.ready) == len(sizes)
        eager_calls.clear()
        for call, want in zip(calls, first):
            torch.testing.assert_close(slots.eps(*call, [()]), want, rtol=1e-5, atol=1e-5)
    assert eager_calls == []  # every size ran its compiled graph
