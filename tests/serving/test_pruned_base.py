"""The shipped pruned bases served like any other (DISTILLERY_MODEL_PATH), over a socket: the SD toy's level 2
and the SSD-1B-style toy-xl. Each one's own adapters load, the original base's are refused, and a pruned base +
4-step adapter + style request batches with the others."""

import asyncio
import base64
import io

import httpx
import pytest
from PIL import Image

from distillery.distill.evaluation.alignment import alignment_of
from distillery.distill.toy.data import eval_prompts
from distillery.paths import MODELS_DIR
from distillery.testing.launch import serve_subprocess

BASES = {"toy-pruned-l2": "toy", "toy-xl-pruned": "toy-xl"}  # pruned base -> the base it was cut from


@pytest.fixture(scope="module", params=list(BASES))
def pruned(request):
    """(URL, the served pruned base's folder name)."""
    with serve_subprocess(env={"DISTILLERY_MODEL_PATH": str(MODELS_DIR / request.param)}) as u:
        yield u, request.param


def _adapters(base: str) -> tuple[str, str, str]:
    """The lcm, guidance and stripes adapter names of a base (toy-pruned-l2 -> lcm-toy-pruned-l2)."""
    return f"lcm-{base}", f"guidance-{base}", f"stripes-{base}"


def test_the_pruned_base_loads_its_adapters_and_refuses_the_originals(pruned):
    url, base = pruned
    model = httpx.get(f"{url}/model", timeout=10).json()
    assert model["path"] == str(MODELS_DIR / base)
    names = {a["name"] for a in httpx.get(f"{url}/adapters", timeout=10).json()["adapters"]}
    originals = _adapters(BASES[base])
    assert set(_adapters(base)) <= names and not names & set(originals)
    resp = httpx.post(f"{url}/generate", json={"prompt": "a red circle", "adapters": [{"name": originals[0]}]},
                      timeout=30)
    assert resp.status_code == 404 and originals[0] in resp.text


def test_every_lever_in_one_request_batched_with_the_others(pruned):
    """Pruned base + 4-step consistency adapter + style in one request, alongside plain CFG requests and
    guidance-adapter requests, all in flight at once; the oracle judges the unstyled images against their
    prompts (the level-2 base scores 0.96 at 25-step CFG: at most one of four may miss)."""
    url, base = pruned
    lcm, guidance, style = _adapters(base)
    prompts = [p for p, _, _ in eval_prompts(6)]
    levers = {"adapters": [{"name": lcm}, {"name": style, "weight": 0.5}]}
    kinds = [levers, {"steps": 25}, {"adapters": [{"name": guidance}], "steps": 25}] * 2
    bodies = [{"prompt": p, "seed": i, "response_format": "json", **k} for i, (p, k) in enumerate(zip(prompts, kinds))]

    async def send():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{url}/generate", json=b) for b in bodies))

    responses = asyncio.run(send())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    infos = [r.json()["info"] for r in responses]
    assert (infos[0]["scheduler"], infos[0]["steps"], infos[0]["unet_evaluations"]) == ("lcm", 4, 4)
    assert infos[0]["adapters"] == [[lcm, 1.0], [style, 0.5]]
    assert [i["mode"] for i in infos[1:3]] == ["cfg", "single-eval"]
    images = [Image.open(io.BytesIO(base64.b64decode(r.json()["image_png_base64"]))) for r in responses]
    assert all(im.size == (32, 32) for im in images)
    unstyled = [1, 2, 4, 5]
    assert alignment_of([images[i] for i in unstyled], [eval_prompts(6)[i] for i in unstyled]) >= 0.75
