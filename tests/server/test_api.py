"""The HTTP API in-process: validation, defaults, PNG output, the server keeps serving."""

import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.app import create_app
from server.config import Settings


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings())) as c:
        yield c


def _png(resp) -> Image.Image:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(resp.content))


def test_generate_returns_png_and_reports_what_it_did(client):
    resp = client.post("/generate", json={"prompt": "a red circle", "guidance": 2, "steps": 4, "seed": 3})
    image = _png(resp)
    assert image.size == (32, 32)
    assert resp.headers["x-unet-evaluations"] == "8" and resp.headers["x-mode"] == "cfg"
    assert float(resp.headers["x-latency-total-ms"]) > 0


def test_same_seed_same_bytes_other_seed_other_image(client):
    body = {"prompt": "a blue square", "guidance": 1.0, "steps": 3, "seed": 11}
    a, b = client.post("/generate", json=body), client.post("/generate", json=body)
    c = client.post("/generate", json={**body, "seed": 12})
    assert a.content == b.content
    assert a.content != c.content


def test_empty_prompt_is_an_unconditional_image(client):
    _png(client.post("/generate", json={"prompt": "", "steps": 2}))


@pytest.mark.parametrize(
    "body, field, allowed",
    [
        ({"prompt": "x", "steps": 0}, "steps", "[1, 1000]"),
        ({"prompt": "x", "steps": 1001}, "steps", "[1, 1000]"),
        ({"prompt": "x", "steps": "25"}, "steps", "[1, 1000]"),
        ({"prompt": "x", "steps": 2.5}, "steps", "[1, 1000]"),
        ({"prompt": "x", "guidance": -0.5}, "guidance", "[0.0, 30.0]"),
        ({"prompt": "x", "guidance": "high"}, "guidance", "[0.0, 30.0]"),
        ({"prompt": "x", "seed": -1}, "seed", "[0, "),
        ({"prompt": 5}, "prompt", "string"),
        ({"prompt": "x", "scheduler": "plms"}, "scheduler", "'ddim'"),
        ({"prompt": "x", "guidence": 2}, "guidence", "known fields"),
        ({}, "prompt", "string"),
    ],
)
def test_bad_input_is_422_naming_field_and_range(client, body, field, allowed):
    resp = client.post("/generate", json=body)
    assert resp.status_code == 422
    errors = resp.json()["detail"]
    mine = [e for e in errors if e["field"] == field]
    assert mine, errors
    assert allowed in mine[0]["message"], mine[0]["message"]


@pytest.mark.parametrize("raw", ['{"prompt": "x", "guidance": NaN}', '{"prompt": "x", "guidance": Infinity}'])
def test_non_finite_guidance_is_rejected(client, raw):
    resp = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["field"] == "guidance"
    assert "finite" in resp.json()["detail"][0]["message"]


def test_server_keeps_serving_after_bad_input(client):
    assert client.post("/generate", content="{not json", headers={"content-type": "application/json"}).status_code == 422
    assert client.post("/generate", json={"prompt": "x", "steps": -3}).status_code == 422
    _png(client.post("/generate", json={"prompt": "a green cross", "steps": 2}))
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").json() == {"ready": True}


def test_openapi_documents_the_guidance_convention(client):
    schema = client.get("/openapi.json").json()
    props = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert "(1 + w)" in props["guidance"]["description"]
    assert json.dumps(props["steps"]).count("1000") >= 1


def test_guidance_distilled_adapter_gives_single_eval_mode(client):
    listed = client.get("/adapters").json()["adapters"]
    assert {"name": "guidance-toy", "kind": "guidance"}.items() <= listed[0].items()
    body = {"prompt": "a red circle", "guidance": 2.0, "steps": 4, "adapters": [{"name": "guidance-toy"}]}
    resp = client.post("/generate", json=body)
    _png(resp)
    assert resp.headers["x-mode"] == "single-eval" and resp.headers["x-unet-evaluations"] == "4"
    assert resp.headers["x-adapters"] == "guidance-toy"
    plain = client.post("/generate", json={**body, "adapters": []})
    assert plain.headers["x-mode"] == "cfg" and plain.content != resp.content


def test_guidance_outside_the_adapters_trained_range_is_422(client):
    body = {"prompt": "a red circle", "guidance": 7.5, "steps": 2, "adapters": [{"name": "guidance-toy"}]}
    resp = client.post("/generate", json=body)
    assert resp.status_code == 422
    detail = resp.json()["detail"][0]
    assert detail["field"] == "guidance" and "[0.0, 5.0]" in detail["message"]


def test_unknown_adapter_is_404_listing_the_available_ones(client):
    resp = client.post("/generate", json={"prompt": "x", "steps": 2, "adapters": [{"name": "guidance"}]})
    assert resp.status_code == 404
    assert "'guidance'" in resp.json()["detail"] and "guidance-toy" in resp.json()["detail"]
