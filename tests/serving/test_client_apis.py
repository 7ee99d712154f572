"""The APIs people's clients already speak, against a live server: the official `openai` client, A1111's `webuiapi`
client, and the native API's n images, random seeds and streamed progress. Each judges the images it got with the
toy oracle (colour and shape named by the prompt), not only the status."""

import base64
import io
import json
from urllib.parse import urlparse

import httpx
import numpy as np
import openai
import pytest
import webuiapi
from PIL import Image

from distillery.distill.toy.oracle import load_oracle
from distillery.serving.config import Settings
from distillery.testing.launch import serve_subprocess

PRESETS = {"fast-stripes": ["lcm-toy", "stripes-toy:0.8"]}


@pytest.fixture(scope="module")
def url():
    with serve_subprocess(env={"DISTILLERY_PRESETS": json.dumps(PRESETS)}, ready_within_s=120) as base:
        yield base


@pytest.fixture(scope="module")
def oracle():
    return load_oracle()


def _verdicts(oracle, images: list[Image.Image]) -> list[tuple[str, str]]:
    return oracle.classify(images)


def _png(b64: str) -> Image.Image:
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(raw))


# ---- OpenAI


def test_openai_client_lists_the_presets_and_generates_n_images(url, oracle):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    models = {m.id for m in client.models.list()}
    assert {"base", "guidance-toy", "lcm-toy", "stripes-toy", "fast-stripes"} <= models
    out = client.images.generate(prompt="a red circle", n=2, size="32x32", response_format="b64_json",
                                 extra_body={"seed": 7})
    images = [_png(d.b64_json) for d in out.data]
    assert [im.size for im in images] == [(32, 32)] * 2
    assert _verdicts(oracle, images) == [("red", "circle")] * 2
    assert [i["seed"] for i in out.model_extra["info"]] == [7, 8]
    fast = client.images.generate(prompt="a blue square", model="lcm-toy", size="auto", extra_body={"seed": 3})
    assert _verdicts(oracle, [_png(fast.data[0].b64_json)]) == [("blue", "square")]
    info = fast.model_extra["info"][0]
    assert (info["scheduler"], info["steps"], info["mode"]) == ("lcm", 4, "single-eval")
    wide = client.images.generate(prompt="a green triangle", model="fast-stripes", size="48x32",
                                  output_format="jpeg", output_compression=90)
    jpeg = base64.b64decode(wide.data[0].b64_json)
    assert jpeg[:2] == b"\xff\xd8" and Image.open(io.BytesIO(jpeg)).size == (48, 32)
    assert wide.model_extra["info"][0]["adapters"] == [["lcm-toy", 1.0], ["stripes-toy", 0.8]]


def test_openai_client_gets_openai_errors_naming_the_field(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad_size:
        client.images.generate(prompt="a red circle", size="1024x1024")
    assert bad_size.value.body["param"] == "size" and "allowed" in bad_size.value.body["message"]
    with pytest.raises(openai.NotFoundError) as unknown:
        client.images.generate(prompt="a red circle", model="dall-e-3")
    assert unknown.value.body["code"] == "model_not_found" and "lcm-toy" in unknown.value.body["message"]
    with pytest.raises(openai.BadRequestError) as url_format:
        client.images.generate(prompt="a red circle", response_format="url")
    assert url_format.value.body["param"] == "response_format" and "b64_json" in url_format.value.body["message"]
    with pytest.raises(openai.BadRequestError) as too_many:
        client.images.generate(prompt="a red circle", n=11)
    assert too_many.value.body["param"] == "n"


def test_presets_are_checked_when_the_server_starts():
    with pytest.raises(ValueError, match="'lcm-toy:heavy' is not 'adapter' or 'adapter:weight'"):
        Settings(presets={"fast": ["lcm-toy:heavy"]})
    with pytest.raises(ValueError, match="weight in \\[0, 2\\]"):
        Settings(presets={"fast": ["lcm-toy:3"]})
    assert Settings(presets={"fast": ["lcm-toy", "stripes-toy:0.8"]}).presets["fast"] == ["lcm-toy", "stripes-toy:0.8"]


# ---- AUTOMATIC1111


def _webui(url: str) -> webuiapi.WebUIApi:
    address = urlparse(url)
    return webuiapi.WebUIApi(host=address.hostname, port=address.port)


def test_webuiapi_client_txt2img_with_its_defaults_and_a_lora_tag(url, oracle):
    api = _webui(url)
    assert {"Euler a", "DDIM", "DPM++ 2M", "LCM"} <= {s["name"] for s in api.get_samplers()}
    assert [m["model_name"] for m in api.get_sd_models()] == ["toy"]
    assert [s["name"] for s in api.get_schedulers()] == ["automatic"]
    assert {"lcm-toy", "stripes-toy"} <= {lora["name"] for lora in api.get_loras()}
    # every field webuiapi sends (enable_hr, styles, eta, alwayson_scripts, ...) at its defaults: accepted
    result = api.txt2img(prompt="a red circle", width=32, height=32, steps=25, cfg_scale=2.0, seed=11,
                         batch_size=2, n_iter=2)
    assert [im.size for im in result.images] == [(32, 32)] * 4
    assert _verdicts(oracle, result.images) == [("red", "circle")] * 4
    assert result.info["all_seeds"] == [11, 12, 13, 14]
    assert (result.info["sampler_name"], result.info["cfg_scale"]) == ("Euler a", 2.0)
    assert [i["guidance"] for i in result.info["distillery"]] == [1.0] * 4  # w = cfg_scale - 1
    fast = api.txt2img(prompt="a blue square <lora:lcm-toy:1>", sampler_name="LCM", steps=4, cfg_scale=2.0,
                       width=32, height=32, seed=3)
    assert _verdicts(oracle, fast.images) == [("blue", "square")]
    info = fast.info["distillery"][0]
    assert (info["adapters"], info["mode"], info["unet_evaluations"]) == ([["lcm-toy", 1.0]], "single-eval", 4)
    seeds = [api.txt2img(prompt="a red circle", steps=1, width=32, height=32, seed=-1).info["seed"] for _ in range(2)]
    assert seeds[0] != seeds[1] and all(0 <= s < 2**32 for s in seeds)  # -1: a random seed each time, reported


@pytest.mark.parametrize("fields, named, allowed", [
    ({"enable_hr": True}, "enable_hr", "allowed: [False, None]"),
    ({"restore_faces": True}, "restore_faces", "allowed: [False, None]"),
    ({"styles": ["cinematic"]}, "styles", "allowed: [[], None]"),
    ({"sampler_name": "Heun"}, "sampler_name", "'DPM++ 2M'"),
    ({"width": 512, "height": 512}, "width", "allowed: a multiple of 8 in [8, 64]"),
    ({"prompt": "a red circle <lora:lcm-toy:5>"}, "prompt", "WEIGHT in [0, 2.0]"),
    ({"sampler_name": "DDIM", "eta": 2.0}, "eta", "allowed: finite number in [0.0, 1.0]"),
])
def test_webuiapi_client_gets_a_422_naming_what_cannot_be_honoured(url, fields, named, allowed):
    with pytest.raises(RuntimeError) as refused:
        _webui(url).txt2img(**{"prompt": "a red circle", "width": 32, "height": 32, "steps": 2, **fields})
    status, text = refused.value.args
    body = json.loads(text)
    assert status == 422 and body["error"] == "RequestValidationError"
    assert body["detail"][0]["field"] == named and allowed in body["errors"], body


# ---- native: n, seeds, progress


def test_native_n_images_have_consecutive_seeds_and_match_single_requests(url, oracle):
    body = {"prompt": "a green triangle", "steps": 25, "response_format": "json"}
    many = httpx.post(f"{url}/generate", json={**body, "n": 3, "seed": 40}, timeout=120).json()
    assert [i["info"]["seed"] for i in many["images"]] == [40, 41, 42] and many["info"]["seed"] == 40
    alone = httpx.post(f"{url}/generate", json={**body, "seed": 41}, timeout=120).json()
    a, b = _png(many["images"][1]["image_png_base64"]), _png(alone["image_png_base64"])
    assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2  # in a batch vs alone
    assert _verdicts(oracle, [_png(i["image_png_base64"]) for i in many["images"]]) == [("green", "triangle")] * 3
    png = httpx.post(f"{url}/generate", json={"prompt": "x", "n": 2}, timeout=30)
    assert png.status_code == 422 and png.json()["detail"][0]["field"] == "n"


def test_native_seed_omitted_is_random_and_reported(url):
    seeds = [int(httpx.post(f"{url}/generate", json={"prompt": "a red circle", "steps": 2}, timeout=60)
                 .headers["x-seed"]) for _ in range(2)]
    assert seeds[0] != seeds[1] and all(0 <= s < 2**32 for s in seeds)


def test_progress_streams_every_step_then_the_answer(url, oracle):
    events = []
    with httpx.stream("POST", f"{url}/generate/stream", json={"prompt": "a blue circle", "steps": 6, "seed": 2,
                                                               "n": 2}, timeout=120) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for frame in resp.read().decode().split("\n\n"):
            if frame.strip():
                name, data = (line.split(": ", 1)[1] for line in frame.splitlines())
                events.append((name, json.loads(data)))
    progress = [d for name, d in events if name == "progress"]
    assert sorted((d["index"], d["step"]) for d in progress) == [(i, k) for i in range(2) for k in range(1, 7)]
    assert events[-1][0] == "result"
    images = [_png(i["image_png_base64"]) for i in events[-1][1]["images"]]
    assert _verdicts(oracle, images) == [("blue", "circle")] * 2
    refused = httpx.post(f"{url}/generate/stream", json={"prompt": "x", "adapters": [{"name": "nope"}]}, timeout=30)
    assert refused.status_code == 404 and "available" in refused.json()["detail"]
