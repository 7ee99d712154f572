"""The shipped pruned base served like any other (DISTILLERY_MODEL_PATH), over a socket: its own adapters load,
the original base's are refused, and a pruned base + 4-step adapter + style request batches with the others."""

import asyncio
import base64
import io

import httpx
import pytest
from PIL import Image

from distillery.distill.evaluate import alignment_of
from distillery.distill.toy_data import eval_prompts
from distillery.paths import MODELS_DIR
from distillery.testing.launch import serve_subprocess

PRUNED = MODELS_DIR / "toy-pruned-l2"
LCM, GUIDANCE, STYLE = "lcm-toy-pruned-l2", "guidance-toy-pruned-l2", "stripes-toy-pruned-l2"


@pytest.fixture(scope="module")
def url():
    with serve_subprocess(env={"DISTILLERY_MODEL_PATH": str(PRUNED)}) as u:
        yield u


def test_the_pruned_base_loads_its_adapters_and_refuses_the_originals(url):
    model = httpx.get(f"{url}/model", timeout=10).json()
    assert model["path"] == str(PRUNED)
    names = {a["name"] for a in httpx.get(f"{url}/adapters", timeout=10).json()["adapters"]}
    assert {LCM, GUIDANCE, STYLE} <= names and not names & {"guidance-toy", "lcm-toy", "stripes-toy"}
    resp = httpx.post(f"{url}/generate", json={"prompt": "a red circle", "adapters": [{"name": "lcm-toy"}]}, timeout=30)
    assert resp.status_code == 404 and "lcm-toy" in resp.text


def test_every_lever_in_one_request_batched_with_the_others(url):
    """Pruned base + 4-step consistency adapter + style in one request, alongside a plain CFG request and a
    guidance-adapter request; each image is judged by the oracle against its prompt."""
    prompts = [p for p, _, _ in eval_prompts(3)]
    bodies = [
        {"prompt": prompts[0], "seed": 1, "adapters": [{"name": LCM}, {"name": STYLE, "weight": 0.5}]},
        {"prompt": prompts[1], "seed": 2, "steps": 25},
        {"prompt": prompts[2], "seed": 3, "adapters": [{"name": GUIDANCE}], "steps": 25},
    ]

    async def send():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{url}/generate", json={**b, "response_format": "json"})
                                          for b in bodies))

    responses = asyncio.run(send())
    infos = [r.json()["info"] for r in responses if r.status_code == 200]
    assert len(infos) == 3, [r.text for r in responses]
    assert (infos[0]["scheduler"], infos[0]["steps"], infos[0]["unet_evaluations"]) == ("lcm", 4, 4)
    assert infos[1]["mode"] == "cfg" and infos[2]["mode"] == "single-eval"
    images = [Image.open(io.BytesIO(base64.b64decode(r.json()["image_png_base64"]))) for r in responses]
    assert alignment_of(images[1:], eval_prompts(3)[1:]) == 1.0  # the two unstyled ones
