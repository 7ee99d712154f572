"""The HTTP API in-process: validation, defaults, PNG output, errors, the OpenAPI document, the server keeps serving."""

import io
import json
import threading

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST

from distillery.serving import jobs as jobs_module
from distillery.serving.app import create_app
from distillery.serving.config import Settings
from distillery.sampling.plan import PlanRefused
from distillery.serving.jobs import EngineUnavailable, QueueFull, RequestTimeout
from distillery.serving.schemas import MAX_SEED


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(api_key=None, max_steps=None))) as c:  # whatever the environment says
        yield c


@pytest.fixture(scope="module")
def capped():
    """An operator's cap below the model's default steps (25)."""
    with TestClient(create_app(Settings(api_key=None, max_steps=3))) as c:
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
        ({"prompt": "x", "guidance_rescale": 1.5}, "guidance_rescale", "[0.0, 1.0]"),
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
    listed = {a["name"]: a for a in client.get("/adapters").json()["adapters"]}
    assert {"name": "guidance-toy", "kind": "guidance", "w_range": [0.0, 5.0]}.items() <= listed["guidance-toy"].items()
    body = {"prompt": "a red circle", "guidance": 2.0, "steps": 4, "adapters": [{"name": "guidance-toy"}]}
    resp = client.post("/generate", json=body)
    _png(resp)
    assert resp.headers["x-mode"] == "single-eval" and resp.headers["x-unet-evaluations"] == "4"
    assert resp.headers["x-adapters"] == "guidance-toy"
    plain = client.post("/generate", json={**body, "adapters": []})
    assert plain.headers["x-mode"] == "cfg" and plain.content != resp.content


def test_guidance_rescale_is_applied_reported_and_cfg_only(client):
    body = {"prompt": "a red circle", "guidance": 4.0, "steps": 3, "seed": 2, "response_format": "json"}
    plain, rescaled = (client.post("/generate", json={**body, "guidance_rescale": r}) for r in (None, 0.7))
    assert plain.json()["info"]["guidance_rescale"] == 0.0 and rescaled.json()["info"]["guidance_rescale"] == 0.7
    assert rescaled.json()["image_png_base64"] != plain.json()["image_png_base64"]
    planned = client.post("/generate/plan", json={"prompt": "x", "guidance_rescale": 0.5}).json()
    assert planned["guidance_rescale"] == 0.5
    info = client.get("/model").json()
    assert info["default_guidance_rescale"] == 0.0 and info["family"] == "sd"  # the toy states no rescale
    distilled = client.post("/generate", json={**body, "guidance": 2.0, "guidance_rescale": 0.7,
                                               "adapters": [{"name": "guidance-toy"}]})
    assert distilled.status_code == 422 and distilled.json()["detail"][0]["field"] == "guidance_rescale"


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


def _post_raw(client, path, raw: str):
    return client.post(path, content=raw, headers={"content-type": "application/json"})


@pytest.mark.parametrize("raw, field", [
    ('{"prompt": "\\udcff"}', "prompt"),
    ('{"prompt": "a red \\ud800circle"}', "prompt"),
    ('{"prompt": "x", "negative_prompt": "\\udcff"}', "negative_prompt"),
    ('{"prompt": "x", "adapters": [{"name": "\\udcff"}]}', "adapters.0.name"),
])
def test_text_that_utf8_cannot_carry_is_422_naming_the_field(client, raw, field):
    """Valid JSON (a lone surrogate escape) that no tokenizer can take: 422 saying so, not a 500."""
    resp = _post_raw(client, "/generate", raw)
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"][0]
    assert detail["field"] == field and "lone surrogate" in detail["message"] and "UTF-8" in detail["message"]
    resp.content.decode("utf-8")  # the answer itself is UTF-8


def test_malformed_bodies_are_4xx_never_500(client):
    assert _post_raw(client, "/generate", '{"prompt": "x", "\\udcff": 1}').status_code == 422  # an odd key
    assert client.post("/generate", content=b'{"prompt": "\xff"}',
                       headers={"content-type": "application/json"}).status_code == 400  # not UTF-8
    assert _post_raw(client, "/generate", "[" * 100_000 + "]" * 100_000).status_code in (400, 422)  # too deep
    assert client.post("/generate", content="prompt=x", headers={"content-type": "text/plain"}).status_code == 422


def test_integral_numbers_are_integers_as_in_json_schema(client):
    resp = client.post("/generate", json={"prompt": "x", "steps": 2.0, "width": 24.0, "seed": 1e3})
    assert resp.status_code == 200 and resp.headers["x-steps"] == "2" and resp.headers["x-seed"] == "1000"
    assert Image.open(io.BytesIO(resp.content)).size == (24, 32)


def test_admin_routes_are_closed_without_a_configured_key(client):
    """No DISTILLERY_API_KEY: POST/DELETE /adapters answer 403 saying how to open them, whatever is sent."""
    names = [a["name"] for a in client.get("/adapters").json()["adapters"]]
    assert "guidance-toy" in names and "s" not in names
    for resp in (client.post("/adapters", json={"name": "s", "path": "guidance-toy"}),
                 client.post("/adapters", json={"name": "s", "path": "guidance-toy"}, headers={"X-API-Key": ""}),
                 client.post("/adapters", json={"name": "s", "path": "guidance-toy"}, headers={"X-API-Key": "guess"}),
                 client.delete("/adapters/guidance-toy", headers={"X-API-Key": "guess"})):
        assert resp.status_code == 403 and "DISTILLERY_API_KEY" in resp.json()["detail"], resp.text
    assert [a["name"] for a in client.get("/adapters").json()["adapters"]] == names  # nothing loaded or unloaded


def test_methods_a_path_lacks_are_405_naming_all_it_has(client):
    resp = client.put("/adapters", json={})
    assert resp.status_code == 405 and resp.headers["allow"] == "GET, POST"
    assert client.get("/adapters/guidance-toy").headers["allow"] == "DELETE"


@pytest.mark.parametrize("exc, status, retry", [
    (QueueFull("queue is full (16 waiting); retry later"), 429, True),
    (RequestTimeout("not answered within the request timeout of 120.0 s; retry later"), 503, True),
    (EngineUnavailable("the engine is not serving (not ready); retry later"), 503, True),
    (PlanRefused("negative_prompt", "negative_prompt: only in cfg mode"), 422, False),
])
def test_engine_exceptions_are_answered_with_their_status(client, monkeypatch, exc, status, retry):
    async def refuse(jobs, on_step=None):
        raise exc

    monkeypatch.setattr(client.app.state.engine, "submit_all", refuse)
    resp = client.post("/generate", json={"prompt": "x", "steps": 2})
    assert resp.status_code == status, resp.text
    if status == 422:
        assert resp.json() == {"detail": [{"field": "negative_prompt", "message": "negative_prompt: only in cfg mode"}]}
    else:
        assert resp.json() == {"detail": str(exc)}
    assert (int(resp.headers["retry-after"]) > 0) if retry else "retry-after" not in resp.headers


def test_png_is_encoded_off_the_event_loop(client, monkeypatch):
    threads = {}
    submit = client.app.state.engine.submit_all

    async def recording_submit(jobs, on_step=None):
        threads["loop"] = threading.get_ident()
        return await submit(jobs, on_step)

    encode = jobs_module.Result.png.fget

    def recording_png(result):
        threads["png"] = threading.get_ident()
        return encode(result)

    monkeypatch.setattr(client.app.state.engine, "submit_all", recording_submit)
    monkeypatch.setattr(jobs_module.Result, "png", property(recording_png))
    _png(client.post("/generate", json={"prompt": "x", "steps": 2}))
    assert threads["png"] != threads["loop"]


def test_an_operators_step_cap_is_enforced_stated_and_caps_the_default(capped):
    resp = capped.post("/generate", json={"prompt": "x", "steps": 4})
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["field"] == "steps" and "allowed: integer in [1, 3]" in resp.json()["detail"][0]["message"]
    assert capped.post("/generate", json={"prompt": "x"}).headers["x-steps"] == "3"  # the model's 25, capped
    info = capped.get("/model").json()
    assert info["max_steps"] == 3 and info["default_steps"] == 3
    props = capped.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]["properties"]
    assert {"type": "integer", "minimum": 1, "maximum": 3}.items() <= props["steps"]["anyOf"][0].items()


# every status each route answers, as the document lists it (tests/serving/test_openapi_conformance.py checks
# the live server against the document)
STATUSES = {
    ("/generate", "post"): {"200", "400", "404", "413", "422", "429", "503"},
    ("/generate/stream", "post"): {"200", "400", "404", "413", "422", "429", "503"},
    ("/generate/plan", "post"): {"200", "400", "404", "413", "422"},
    ("/adapters", "get"): {"200"},
    ("/adapters", "post"): {"201", "400", "401", "403", "404", "409", "413", "422"},
    ("/adapters/{name}", "delete"): {"200", "401", "403", "404", "409"},
    ("/model", "get"): {"200"},
    ("/metrics", "get"): {"200"},
    ("/healthz", "get"): {"200", "503"},
    ("/readyz", "get"): {"200", "503"},
    ("/v1/images/generations", "post"): {"200", "400", "404", "413", "429", "503"},
    ("/v1/models", "get"): {"200"},
    ("/sdapi/v1/txt2img", "post"): {"200", "400", "404", "413", "422", "429", "503"},
    ("/sdapi/v1/samplers", "get"): {"200"},
    ("/sdapi/v1/schedulers", "get"): {"200"},
    ("/sdapi/v1/sd-models", "get"): {"200"},
    ("/sdapi/v1/loras", "get"): {"200"},
}
ERROR_BODIES = {"/v1/": "/OpenAIError", "/sdapi/": "/A1111Error"}  # each API's own error shape


def test_openapi_lists_every_status_with_its_body(client):
    doc = client.get("/openapi.json").json()
    ops = {(path, method): op for path, item in doc["paths"].items() for method, op in item.items()}
    assert {k: set(op["responses"]) for k, op in ops.items()} == STATUSES
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas  # FastAPI's 422 shape is not this API's
    for (path, method), op in ops.items():
        for status, response in op["responses"].items():
            assert response.get("content"), (path, method, status)
            own = next((body for prefix, body in ERROR_BODIES.items() if path.startswith(prefix)), None)
            if own and status != "200":
                assert response["content"]["application/json"]["schema"]["$ref"].endswith(own), (path, status)
                continue
            # /readyz and /healthz answer their own bodies ({ready}, {status: dead}) when not ready or dead
            if status in ("401", "403", "404", "409", "400", "413", "429", "503") and path not in ("/readyz", "/healthz"):
                assert response["content"]["application/json"]["schema"]["$ref"].endswith("/Problem")
            if status == "422":
                assert response["content"]["application/json"]["schema"]["$ref"].endswith("/InvalidFields")
            if status in ("429", "503") and path == "/generate":
                assert response["headers"]["Retry-After"]["required"] is True
    generate = ops[("/generate", "post")]["responses"]["200"]["content"]
    assert generate["image/png"]["schema"]["format"] == "binary"
    assert generate["application/json"]["schema"]["$ref"].endswith("/GenerateJSON")
    assert set(ops[("/metrics", "get")]["responses"]["200"]["content"]) == {CONTENT_TYPE_LATEST}
    assert ops[("/readyz", "get")]["responses"]["503"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/Readiness")


def test_openapi_declares_the_key_on_admin_routes_only(client):
    doc = client.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"] == {"APIKey": {
        "type": "apiKey", "in": "header", "name": "X-API-Key", "description": doc["components"]["securitySchemes"][
            "APIKey"]["description"]}}
    secured = {(p, m) for p, item in doc["paths"].items() for m, op in item.items() if op.get("security")}
    assert secured == {("/adapters", "post"), ("/adapters/{name}", "delete")}


def test_openapi_states_the_loaded_models_limits(client):
    props = client.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]["properties"]
    model = client.get("/model").json()
    assert model["max_steps"] == 1000 and model["size_step"] == 8 and model["max_size"] == 64
    steps = next(b for b in props["steps"]["anyOf"] if b["type"] == "integer")
    assert steps["minimum"] == 1 and steps["maximum"] == model["max_steps"]
    for field in ("width", "height"):
        size = next(b for b in props[field]["anyOf"] if b["type"] == "integer")
        assert (size["minimum"], size["maximum"], size["multipleOf"]) == (8, 64, 8)
    seed = next(b for b in props["seed"]["anyOf"] if b["type"] == "integer")
    assert seed["maximum"] == MAX_SEED  # exactly: 2**63 - 1 is no float
    path = client.get("/openapi.json").json()["components"]["schemas"]["LoadAdapterRequest"]["properties"]["path"]
    assert "pattern" in path
