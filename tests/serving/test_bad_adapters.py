"""Broken adapters never stop the server: at start each is logged and skipped and the rest are served; through
POST /adapters each is a 400 naming the file and the problem, and the server goes on serving. The broken folders:
tests/adapters/bad_adapters.py."""

import shutil

import httpx
import pytest
from fastapi.testclient import TestClient

from distillery.paths import EMBEDDED_ADAPTERS
from distillery.serving.app import create_app
from distillery.serving.config import Settings
from distillery.testing.launch import serve_subprocess

from ..adapters.bad_adapters import BAD, write_bad

GOOD = ["lcm-toy", "stripes-toy"]
KEY = "bad-adapters-key"
READY_WITHIN_S = 600  # a loaded 2-core machine: the model, the adapters, the backend timings and the warm-up


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Good copies of two shipped adapters and every broken one of BAD."""
    root = tmp_path_factory.mktemp("adapters")
    for name in GOOD:
        shutil.copytree(EMBEDDED_ADAPTERS / name, root / name)
    for name in BAD:
        write_bad(root, name)
    return root


def _generates(get_or_post, **kwargs) -> None:
    body = {"prompt": "a red circle", "adapters": [{"name": "stripes-toy"}], "steps": 2, "seed": 1}
    resp = get_or_post("/generate", json=body, **kwargs)
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png", resp.text[:300]


def test_a_server_started_on_a_root_with_broken_adapters_serves_the_good_ones(root):
    with serve_subprocess(ready_within_s=READY_WITHIN_S, env={"DISTILLERY_ADAPTERS_ROOT": str(root)}) as url:
        listed = httpx.get(f"{url}/adapters", timeout=60).json()["adapters"]
        assert sorted(a["name"] for a in listed) == GOOD
        _generates(lambda path, **kw: httpx.post(f"{url}{path}", **kw), timeout=300)


def test_posting_a_broken_adapter_is_a_400_naming_the_file_and_the_problem(root):
    with TestClient(create_app(Settings(adapters_root=str(root), api_key=KEY))) as client:
        assert sorted(a["name"] for a in client.get("/adapters").json()["adapters"]) == GOOD
        for name, (_, _, says) in BAD.items():
            resp = client.post("/adapters", json={"name": f"posted-{name}", "path": name}, headers={"X-API-Key": KEY})
            detail = resp.json()["detail"]
            assert resp.status_code == 400, (name, resp.text)
            assert str(root / name) in detail and says.replace(f"'{name}'", f"'posted-{name}'") in detail, detail
        assert sorted(a["name"] for a in client.get("/adapters").json()["adapters"]) == GOOD
        _generates(client.post)
