"""Step-distilled adapters served with their own schedulers and step counts, composed with a style, batched
with everything else; what they cannot do is a 422 naming the allowed values."""

import asyncio
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from distillery.model import DiffusionModel
from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_MODEL
from distillery.serving.app import create_app
from distillery.serving.config import Settings
from distillery.serving.engine import Engine
from distillery.serving.jobs import Job

LCM, PROGRESSIVE, STYLE = "lcm-toy", "progressive-toy-4", "stripes-toy"


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(api_key=None, max_steps=None))) as c:
        yield c


def _info(resp) -> dict:
    assert resp.status_code == 200, resp.text
    return resp.json()["info"]


def test_adapters_list_their_schedulers_and_step_counts(client):
    listed = {a["name"]: a for a in client.get("/adapters").json()["adapters"]}
    assert {"kind": "consistency", "recommended_scheduler": "lcm", "recommended_steps": 4, "schedulers": ["lcm"],
            "steps": list(range(1, 9))}.items() <= listed[LCM].items()
    assert {"kind": "progressive", "recommended_scheduler": "ddim", "recommended_steps": 4, "schedulers": ["ddim"],
            "steps": [4]}.items() <= listed[PROGRESSIVE].items()
    assert listed[STYLE]["kind"] == "style" and "steps" not in listed[STYLE]


@pytest.mark.parametrize("name, scheduler, steps", [(LCM, "lcm", 4), (PROGRESSIVE, "ddim", 4)])
def test_a_request_defaults_to_the_adapters_scheduler_and_steps(client, name, scheduler, steps):
    info = _info(client.post("/generate", json={"prompt": "a red circle", "guidance": 1.0, "response_format": "json",
                                                "adapters": [{"name": name}]}))
    assert (info["scheduler"], info["steps"], info["mode"], info["unet_evaluations"]) == (scheduler, steps,
                                                                                         "single-eval", steps)


def test_fewer_lcm_steps_are_allowed_and_asked_steps_are_reported(client):
    info = _info(client.post("/generate", json={"prompt": "a red circle", "steps": 2, "response_format": "json",
                                                "adapters": [{"name": LCM}]}))
    assert info["steps"] == 2 and info["unet_evaluations"] == 2


@pytest.mark.parametrize("body, field, allowed", [
    ({"steps": 9, "adapters": [{"name": LCM}]}, "steps", "allowed: integer in [1, 8]"),
    ({"steps": 25, "adapters": [{"name": PROGRESSIVE}]}, "steps", "allowed: one of [4]"),
    ({"scheduler": "ddim", "adapters": [{"name": LCM}]}, "scheduler", "allowed: lcm"),
    ({"scheduler": "lcm", "adapters": [{"name": PROGRESSIVE}]}, "scheduler", "allowed: ddim"),
    ({"adapters": [{"name": LCM}, {"name": PROGRESSIVE}]}, "adapters", "allowed: one of them"),
    ({"adapters": [{"name": LCM}, {"name": "guidance-toy"}]}, "adapters", "allowed: one of them"),
])
def test_what_a_step_distilled_adapter_cannot_do_is_422_naming_the_allowed_values(client, body, field, allowed):
    resp = client.post("/generate", json={"prompt": "a red circle", **body})
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert detail[0]["field"] == field and allowed in detail[0]["message"], detail
    assert client.post("/generate", json={"prompt": "x", "steps": 1}).status_code == 200  # still serving


def test_a_style_composes_with_the_four_step_adapter(client):
    body = {"prompt": "a large blue square", "guidance": 1.0, "seed": 5, "adapters": [{"name": LCM}]}
    plain = client.post("/generate", json=body)
    styled = client.post("/generate", json={**body, "adapters": [{"name": LCM}, {"name": STYLE, "weight": 1.0}]})
    assert plain.status_code == styled.status_code == 200
    assert styled.headers["x-unet-evaluations"] == "4" and styled.headers["x-adapters"] == f"{LCM},{STYLE}"
    assert Image.open(io.BytesIO(plain.content)).tobytes() != Image.open(io.BytesIO(styled.content)).tobytes()


def test_step_distilled_requests_share_unet_calls_with_everything_else():
    """A consistency (with a style), a progressive, a guidance and a CFG request in flight together, each at its
    own scheduler: all their rows go through one UNet call per step."""

    async def scenario():
        engine = Engine(DiffusionModel.from_pretrained(EMBEDDED_MODEL), queue_size=16, max_rows=16)
        engine.load_adapters_from(EMBEDDED_ADAPTERS)
        await engine.start()
        jobs = [Job("a red circle", 1.0, None, 1, adapters=((LCM, 1.0), (STYLE, 0.8))),
                Job("a blue cross", 2.0, None, 2, adapters=((PROGRESSIVE, 1.0),)),
                Job("a green square", 1.5, 4, 3, adapters=(("guidance-toy", 1.0),)),
                Job("a cyan triangle", 1.0, 4, 4)]
        calls = []
        hook = engine.model.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
        results = await asyncio.gather(*(engine.submit(j) for j in jobs))
        hook.remove()
        await engine.stop()
        return results, calls

    results, calls = asyncio.run(scenario())
    assert [(r.job.scheduler, r.job.steps, r.unet_evaluations) for r in results] == [
        ("lcm", 4, 4), ("ddim", 4, 4), ("ddim", 4, 4), ("ddim", 4, 8)]
    assert calls == [1 + 1 + 1 + 2] * 4, calls
