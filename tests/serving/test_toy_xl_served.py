"""The SDXL-family toy served as the SD toy is (DISTILLERY_MODEL_PATH=models/toy-xl), over a socket, through the
clients people have: the official `openai` client and A1111's `webuiapi`, with toy-xl's own adapters (the SD
toy's are skipped: another fingerprint). The oracle judges what comes back (toy-xl: 0.975 alignment at its
default w, so at most one image in four may miss)."""

import base64
import io
import json
from urllib.parse import urlparse

import openai
import pytest
import webuiapi
from PIL import Image

from distillery.distill.toy.oracle import load_oracle
from distillery.paths import EMBEDDED_XL_MODEL
from distillery.testing.launch import serve_subprocess

GUIDANCE, LCM, STYLE = "guidance-toy-xl", "lcm-toy-xl", "stripes-toy-xl"
PRESETS = {"fast-stripes": [LCM, f"{STYLE}:0.8"]}


@pytest.fixture(scope="module")
def url():
    env = {"DISTILLERY_MODEL_PATH": str(EMBEDDED_XL_MODEL), "DISTILLERY_PRESETS": json.dumps(PRESETS)}
    with serve_subprocess(env=env, ready_within_s=120) as base:
        yield base


@pytest.fixture(scope="module")
def oracle():
    return load_oracle()


def _right(oracle, images: list[Image.Image], colour: str, shape: str) -> int:
    return sum(verdict == (colour, shape) for verdict in oracle.classify(images))


def test_openai_client_on_toy_xl_with_its_adapters_and_a_preset(url, oracle):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    models = {m.id for m in client.models.list()}
    assert {"base", GUIDANCE, LCM, STYLE, "fast-stripes"} <= models and "lcm-toy" not in models
    out = client.images.generate(prompt="a red circle", n=2, size="32x32", response_format="b64_json",
                                 extra_body={"seed": 7})
    fast = client.images.generate(prompt="a red circle", model=LCM, n=2, size="32x32", extra_body={"seed": 7})
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in out.data + fast.data]
    assert [im.size for im in images] == [(32, 32)] * 4
    assert _right(oracle, images, "red", "circle") >= 3
    info = fast.model_extra["info"][0]
    assert (info["scheduler"], info["steps"], info["mode"], info["unet_evaluations"]) == ("lcm", 4, "single-eval", 4)
    wide = client.images.generate(prompt="a green triangle", model="fast-stripes", size="48x32")
    assert Image.open(io.BytesIO(base64.b64decode(wide.data[0].b64_json))).size == (48, 32)
    assert wide.model_extra["info"][0]["adapters"] == [[LCM, 1.0], [STYLE, 0.8]]


def test_webuiapi_client_on_toy_xl_with_a_lora_tag(url, oracle):
    address = urlparse(url)
    api = webuiapi.WebUIApi(host=address.hostname, port=address.port)
    assert [m["model_name"] for m in api.get_sd_models()] == ["toy-xl"]
    assert {LCM, STYLE, GUIDANCE} <= {lora["name"] for lora in api.get_loras()}
    cfg = api.txt2img(prompt="a blue square", negative_prompt="red", width=32, height=32, steps=25, cfg_scale=3.0,
                      seed=11, batch_size=2)
    fast = api.txt2img(prompt=f"a blue square <lora:{LCM}:1>", sampler_name="LCM", steps=4, cfg_scale=3.0,
                       width=32, height=32, seed=11, batch_size=2)
    assert [im.size for im in cfg.images + fast.images] == [(32, 32)] * 4
    assert _right(oracle, cfg.images + fast.images, "blue", "square") >= 3
    info = fast.info["distillery"][0]
    assert (info["adapters"], info["mode"], info["unet_evaluations"]) == ([[LCM, 1.0]], "single-eval", 4)
