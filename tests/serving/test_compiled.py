"""DISTILLERY_COMPILE: the server's UNet calls through the slot UNet under torch.compile. The backend here is
`eager` (dynamo's graphs and guards, no code generation: recompilation is decided by the guards alone, and
the test stays fast); `make bench BENCH=compile` times inductor."""

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from torch._dynamo.utils import counters

from distillery.serving.app import create_app
from distillery.serving.config import Settings

REQUESTS = [  # adapters swap in and out of 3 slots; sets, weights, w, n (rows: 1 to 6) vary
    {"prompt": "a red circle", "steps": 3, "n": 3},
    {"prompt": "a blue square", "adapters": [{"name": "guidance-toy"}], "guidance": 2.0, "steps": 3},
    {"prompt": "a green triangle", "adapters": [{"name": "lcm-toy"}, {"name": "stripes-toy", "weight": 0.5}]},
    {"prompt": "a red circle", "adapters": [{"name": "progressive-toy-4"}], "guidance": 1.0, "n": 2},
    {"prompt": "a yellow cross", "adapters": [{"name": "stripes-toy", "weight": 1.5}], "steps": 2, "n": 2},
    {"prompt": "a blue circle", "adapters": [{"name": "progressive-toy-2"}, {"name": "stripes-toy"}], "n": 4},
    {"prompt": "a red square", "scheduler": "euler", "steps": 3},
]


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
    with TestClient(create_app(Settings(compile="eager", compile_slots=3))) as client:  # warm-up compiled buckets
        graphs = counters["stats"]["unique_graphs"]
        compiled = [_images(client, body) for body in REQUESTS]
        assert counters["stats"]["unique_graphs"] == graphs  # no recompilation after warm-up
    for got, want in zip(compiled, eager_images):
        assert all(np.abs(g - w).max() <= 2 for g, w in zip(got, want))  # rounding of another summation order


def test_compile_settings_are_validated():
    with pytest.raises(ValueError, match="compile"):
        Settings(compile="max-autotune")
