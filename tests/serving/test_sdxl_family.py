"""An SDXL-family folder served like any other (DISTILLERY_MODEL_PATH): its conditioning (two text encoders,
pooled embeds, size ids) goes through every API, every LoRA backend and the step-level batching."""

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from distillery.adapters import AdapterRegistry, SlotAdapters
from distillery.model import Conditioning, DiffusionModel
from distillery.sampling.guidance import EMBEDDING_DIM, guidance_embedding
from distillery.serving.app import create_app
from distillery.serving.config import Settings
from distillery.testing.synthetic_adapters import write_random_adapter


@pytest.fixture(scope="module")
def xl_adapters(random_toy_xl_folder, tmp_path_factory):
    model = DiffusionModel.from_pretrained(random_toy_xl_folder)
    root = tmp_path_factory.mktemp("xl_adapters")
    write_random_adapter(root / "style-xl", model.unet, model.fingerprint, kind="style", rank=4)
    write_random_adapter(root / "guidance-xl", model.unet, model.fingerprint, kind="guidance", rank=4, seed=1)
    write_random_adapter(root / "lcm-xl", model.unet, model.fingerprint, kind="consistency", rank=4, seed=2)
    return root


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.mark.parametrize("backend", ["per_row", "merged"])
def test_every_api_answers_with_the_asked_size_while_sizes_and_adapters_share_the_steps(
        random_toy_xl_folder, xl_adapters, backend):
    settings = Settings(model_path=str(random_toy_xl_folder), adapters_root=str(xl_adapters), api_key=None,
                        adapter_backend=backend)
    calls = [
        ("/generate", {"prompt": "a red circle", "steps": 6, "response_format": "json"}, (32, 32)),
        ("/generate", {"prompt": "a red circle", "steps": 6, "width": 48, "height": 32, "response_format": "json",
                       "adapters": [{"name": "style-xl", "weight": 0.8}]}, (48, 32)),
        ("/generate", {"prompt": "a blue square", "steps": 6, "negative_prompt": "green",
                       "response_format": "json"}, (32, 32)),
        ("/generate", {"prompt": "a blue square", "steps": 6, "guidance": 2.0, "response_format": "json",
                       "adapters": [{"name": "guidance-xl"}]}, (32, 32)),
        ("/generate", {"prompt": "a blue square", "guidance": 2.0, "width": 48, "height": 32, "response_format": "json",
                       "adapters": [{"name": "lcm-xl"}, {"name": "style-xl"}]}, (48, 32)),
        ("/v1/images/generations", {"prompt": "a red circle", "size": "32x48", "response_format": "b64_json"},
         (32, 48)),
        ("/sdapi/v1/txt2img", {"prompt": "a red circle <lora:style-xl:0.5>", "width": 48, "height": 48,
                               "steps": 4}, (48, 48)),
    ]
    with TestClient(create_app(settings)) as client:
        info = client.get("/model").json()
        assert (info["family"], info["lora_backends"]["one_set"]) == ("sdxl", backend)
        with ThreadPoolExecutor(len(calls)) as pool:
            answers = list(pool.map(lambda c: client.post(c[0], json=c[1]), calls))
        for (path, _, size), resp in zip(calls, answers):
            assert resp.status_code == 200, (path, resp.text)
            body = resp.json()
            b64 = body.get("image_png_base64") or (body.get("data") or [{}])[0].get("b64_json") or body["images"][0]
            assert _png(b64).size == size, path
        infos = [answers[i].json()["info"] for i in (0, 3, 4)]
        assert [info["mode"] for info in infos] == ["cfg", "single-eval", "single-eval"]
        assert (infos[2]["scheduler"], infos[2]["steps"], infos[2]["unet_evaluations"]) == ("lcm", 4, 4)


def test_the_compiled_slots_take_sdxl_conditioning_as_graph_inputs(random_toy_xl_folder, xl_adapters, monkeypatch):
    """Text states, pooled embeds and size ids are arguments of the compiled graph (dynamo's graphs, no code
    generation): rows of two sizes' ids in one call give per-row LoRA's eps."""
    model = DiffusionModel.from_pretrained(random_toy_xl_folder)
    slots = SlotAdapters(model.unet, EMBEDDING_DIM, slots=2, rank=4, backend="eager")
    registry = AdapterRegistry(model, merged_budget_bytes=0, slots=slots)
    style, guidance = (registry.load(n, xl_adapters / n) for n in ("style-xl", "guidance-xl"))
    row_sets = [((style, 0.7),), ((guidance, 1.0),), ()]
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, *model.latent_shape(32, 32), generator=g), torch.tensor([900, 500, 100])
    cond = Conditioning.cat([model.encode_prompts(["a red circle", "a blue square"]).sized(32, 32),
                             model.encode_prompts([None]).sized(64, 48)])
    w_emb = guidance_embedding(torch.tensor([0.0, 2.0, 0.0]))
    monkeypatch.setenv("DISTILLERY_LORA_BACKEND", "torch")
    with torch.no_grad():
        want = registry.backends["per_row"].eps(x, t, cond, w_emb, row_sets)
        got = slots.eps(x, t, cond, w_emb, row_sets)
        base = registry.backends["per_row"].eps(x, t, cond, w_emb, [()] * 3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert sum(slots.compiles.values()) == 1  # the call ran as a graph
    assert not torch.allclose(want[:2], base[:2], atol=1e-3)  # and its adapters acted
