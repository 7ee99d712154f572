"""Engine and admin behaviour: batching, determinism, adapters at runtime, metrics, bad input."""

import asyncio
import io
import json
import shutil

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from distillery.model import DiffusionModel
from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_MODEL
from distillery.serving.app import create_app
from distillery.serving.config import Settings
from distillery.serving.engine import Engine
from distillery.serving.jobs import Job
from distillery.testing.synthetic_adapters import write_random_adapter

KEY = "s3cret"


@pytest.fixture(scope="module")
def root(tmp_path_factory, toy_model):
    root = tmp_path_factory.mktemp("adapters")
    shutil.copytree(EMBEDDED_ADAPTERS / "guidance-toy", root / "guidance-toy")
    for i in range(2):
        write_random_adapter(root / "spare" / f"style{i}", toy_model.unet, toy_model.fingerprint, rank=4 + 4 * i, seed=i)
    return root


@pytest.fixture(scope="module")
def client(root):
    with TestClient(create_app(Settings(adapters_root=str(root), api_key=KEY))) as c:
        yield c


def _load(client, name, path, key=KEY):
    return client.post("/adapters", json={"name": name, "path": path}, headers={"X-API-Key": key} if key else {})


def test_admin_routes_need_the_key(client):
    for resp in (_load(client, "s", "spare/style0", key=None), _load(client, "s", "spare/style0", key="wrong"),
                 _load(client, "s", "spare/style0", key=KEY + "x"), client.delete("/adapters/guidance-toy"),
                 client.delete("/adapters/guidance-toy", headers={"X-API-Key": b"\xff\xfe"})):  # not ASCII: still 401
        assert resp.status_code == 401 and "X-API-Key" in resp.json()["detail"], resp.text
        assert "X-API-Key" in resp.headers["www-authenticate"]
    assert "s" not in {a["name"] for a in client.get("/adapters").json()["adapters"]}
    assert client.get("/adapters").status_code == 200  # reading needs no key


def test_load_compose_and_unload_a_style_adapter(client):
    assert _load(client, "style0", "spare/style0").status_code == 201
    body = {"prompt": "a red circle", "guidance": 2.0, "steps": 3, "seed": 5}
    plain = client.post("/generate", json=body)
    styled = client.post("/generate", json={**body, "adapters": [{"name": "style0", "weight": 1.0}]})
    both = client.post("/generate", json={**body, "adapters": [{"name": "guidance-toy"}, {"name": "style0"}]})
    assert plain.headers["x-mode"] == styled.headers["x-mode"] == "cfg" and both.headers["x-mode"] == "single-eval"
    assert len({plain.content, styled.content, both.content}) == 3
    assert client.delete("/adapters/style0", headers={"X-API-Key": KEY}).status_code == 200
    gone = client.post("/generate", json={**body, "adapters": [{"name": "style0"}]})
    assert gone.status_code == 404 and "guidance-toy" in gone.json()["detail"]


@pytest.mark.parametrize(
    "name, path, status, reason",
    [
        ("bad", "spare", 400, "adapter.json"),  # a folder, not an adapter
        ("bad", "escape", 400, "outside the adapters root"),  # a symlink out of the root
        ("bad", "nowhere", 404, "LoRA file 'nowhere'"),
        ("bad", "spare/style0/adapter.json", 404, "no adapter folder"),  # a file
        ("bad", "x" * 300, 404, "no adapter folder"),  # longer than a file name can be
        ("guidance-toy", "spare/style0", 409, "registered already"),
        ("bad", "../..", 422, "relative folder path"),  # what the document's pattern rules out: 422 naming path
        ("bad", "/etc", 422, "relative folder path"),
        ("bad", "spare/../..", 422, "relative folder path"),
        ("bad", "spare//style0", 422, "relative folder path"),
        ("bad", "spare/sty\x00le0", 422, "control characters"),
        ("bad", "spare/\udcff", 422, "lone surrogate"),
        ("bad name", "spare/style0", 422, "letters, digits"),
    ],
)
def test_bad_adapter_loads_are_refused_with_the_reason_and_change_nothing(client, root, tmp_path, name, path, status,
                                                                          reason):
    if not (root / "escape").exists():
        shutil.copytree(root / "spare" / "style0", tmp_path / "style0")
        (root / "escape").symlink_to(tmp_path / "style0")  # an adapter, but outside the root
    before = client.get("/adapters").json()
    body = json.dumps({"name": name, "path": path})  # json.dumps: a lone surrogate is valid JSON ("\udcff")
    resp = client.post("/adapters", content=body, headers={"X-API-Key": KEY, "content-type": "application/json"})
    assert resp.status_code == status, resp.text
    detail = resp.json()["detail"]
    if status == 422:
        assert detail[0]["field"] == ("name" if " " in name else "path") and reason in detail[0]["message"], detail
    else:
        assert reason in detail, detail
    assert client.get("/adapters").json() == before
    assert client.post("/generate", json={"prompt": "x", "steps": 2}).status_code == 200


def test_corrupt_or_foreign_adapter_is_refused(client, root):
    corrupt = root / "spare" / "corrupt"
    shutil.copytree(root / "spare" / "style1", corrupt)
    (corrupt / "pytorch_lora_weights.safetensors").write_bytes(b"garbage")
    assert "not a readable safetensors" in _load(client, "c", "spare/corrupt").json()["detail"]
    pickled = root / "spare" / "pickled"
    shutil.copytree(root / "spare" / "style1", pickled)
    (pickled / "pytorch_lora_weights.safetensors").rename(pickled / "pytorch_lora_weights.bin")
    assert "safetensors files only" in _load(client, "p", "spare/pickled").json()["detail"]
    foreign = root / "spare" / "foreign"
    shutil.copytree(root / "spare" / "style1", foreign)
    meta = (foreign / "adapter.json").read_text().replace('"base_fingerprint": "', '"base_fingerprint": "0')
    (foreign / "adapter.json").write_text(meta)
    assert "trained on base model" in _load(client, "f", "spare/foreign").json()["detail"]


def test_json_response_format_and_sizes(client):
    resp = client.post("/generate", json={"prompt": "a blue square", "steps": 2, "width": 48, "height": 24,
                                          "response_format": "json"})
    info = resp.json()["info"]
    assert set(info["latency_ms"]) >= {"queue", "text_encode", "denoise", "decode", "total"}
    assert info["peak_memory"]["kind"] == "process_rss" and info["peak_memory"]["peak_bytes"] > 0
    import base64

    image = Image.open(io.BytesIO(base64.b64decode(resp.json()["image_png_base64"])))
    assert image.size == (48, 24)
    bad = client.post("/generate", json={"prompt": "x", "width": 30})
    assert bad.status_code == 422 and "multiple of 8 in [8, 64]" in bad.json()["detail"][0]["message"]


def test_negative_prompt_is_cfg_only(client):
    body = {"prompt": "a red circle", "steps": 2, "seed": 1, "guidance": 3.0}  # w > 0: the uncond branch counts
    assert client.post("/generate", json={**body, "negative_prompt": "a blue square"}).content != \
        client.post("/generate", json=body).content
    resp = client.post("/generate", json={**body, "negative_prompt": "x", "adapters": [{"name": "guidance-toy"}]})
    assert resp.status_code == 422 and resp.json()["detail"][0]["field"] == "negative_prompt"


def test_metrics_are_exposed(client):
    client.post("/generate", json={"prompt": "x", "steps": 2})
    text = client.get("/metrics").text
    for name in ("distillery_request_latency_seconds_bucket", "distillery_queue_depth", "distillery_batch_rows_bucket",
                 "distillery_unet_evaluations_total", 'distillery_device_memory_bytes{kind="peak"',
                 "distillery_adapters_resident", "distillery_adapters_resident_bytes", "distillery_adapter_loads_total",
                 "distillery_adapter_evictions_total", "distillery_errors_total"):
        assert name in text, name


def test_same_request_same_image_whatever_shares_its_batch():
    """Deterministic mode: requests of other t, w, adapters, schedulers and sizes in flight leave a
    request's PNG bytes exactly as they are when it runs alone."""

    async def scenario():
        engine = Engine(DiffusionModel.from_pretrained(EMBEDDED_MODEL), queue_size=16, max_rows=16, deterministic=True)
        engine.load_adapters_from(EMBEDDED_ADAPTERS)
        await engine.start()
        probes = [Job(prompt="a small red circle", guidance=2.0, steps=6, seed=7),
                  Job(prompt="a blue square", guidance=1.5, steps=5, seed=11, adapters=(("guidance-toy", 1.0),))]
        alone = [await engine.submit(p) for p in probes]
        others = [Job(prompt="a cyan cross", guidance=1.0, steps=9, seed=1, height=64, width=24),
                  Job(prompt="a green square", guidance=3.0, steps=4, seed=2, adapters=(("guidance-toy", 1.0),)),
                  Job(prompt="", guidance=0.0, steps=6, seed=3, scheduler="euler")]
        crowd = await asyncio.gather(*(engine.submit(j) for j in others), *(engine.submit(p) for p in probes))
        rows = engine.metrics.batch_rows.collect()[0].samples
        await engine.stop()
        return alone, crowd[len(others):], crowd, rows

    alone, probed, crowd, rows = asyncio.run(scenario())
    for solo, shared in zip(alone, probed):
        assert solo.png == shared.png
    batched = max(s.value for s in rows if s.name.endswith("_sum"))
    assert batched > 2 * 6 + 5  # the probes' rows really shared calls with others
    assert crowd[1].mode == "single-eval" and crowd[1].unet_evaluations == 4


def test_unloading_an_adapter_in_use_is_refused(root):
    from distillery.adapters import AdapterInUse, AdapterRegistry

    registry = AdapterRegistry(DiffusionModel.from_pretrained(EMBEDDED_MODEL))
    adapter = registry.load("held", root / "spare" / "style1")
    registry.acquire(((adapter, 1.0),))
    with pytest.raises(AdapterInUse, match="in use by 1 request"):
        registry.unload("held")
    registry.release(((adapter, 1.0),))
    registry.unload("held")
    assert "held" not in registry.known


def test_byte_budget_evicts_least_recently_used_and_reloads_on_demand(root):
    from distillery.adapters import AdapterRegistry

    model = DiffusionModel.from_pretrained(EMBEDDED_MODEL)  # its own registry
    registry = AdapterRegistry(model)
    small = registry.load("small", root / "spare" / "style0")
    registry.budget_bytes = small.nbytes * 2 + 1  # style1 (rank 8) is twice style0 (rank 4): one of them fits
    registry.load("big", root / "spare" / "style1")
    assert list(registry.resident) == ["big"] and registry.evictions == 1
    again = registry.get("small")  # evicted, still known: reloaded from disk, evicting the other
    assert list(registry.resident) == ["small"] and registry.loads == 3 and registry.evictions == 2
    assert again.nbytes == small.nbytes
    registry.acquire(((again, 1.0),))
    with pytest.raises(Exception, match="does not fit"):
        registry.get("big")  # the only resident adapter is in use: no room


def test_two_guidance_adapters_in_one_request_is_422(client, root, toy_model):
    write_random_adapter(root / "g2", toy_model.unet, toy_model.fingerprint, kind="guidance", rank=4)
    assert _load(client, "g2", "g2").status_code == 201
    resp = client.post("/generate", json={"prompt": "x", "steps": 2, "adapters": [{"name": "guidance-toy"}, {"name": "g2"}]})
    detail = resp.json()["detail"][0]
    assert resp.status_code == 422 and detail["field"] == "adapters" and "at most one distilled adapter" in detail["message"]


def test_switching_adapters_copies_neither_w0_nor_adapter_weights(root):
    from distillery.adapters import AdapterRegistry

    model = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    w0 = {n: p.data_ptr() for n, p in model.unet.named_parameters()}
    w0_values = {n: p.clone() for n, p in model.unet.named_parameters()}
    registry = AdapterRegistry(model, merged_budget_bytes=0)  # the unmerged path: per-row LoRA views
    a = registry.load("a", root / "spare" / "style0")
    b = registry.load("b", root / "spare" / "style1")
    layer = next(iter(a.layers))
    for chosen in (((a, 1.0),), ((b, 1.0),), ((a, 1.0),)):
        batch = registry.backend.plan([chosen, chosen])
        lora_a, lora_b, scales, _ = batch.layers[layer]
        assert lora_a.data_ptr() == chosen[0][0].layers[layer][0].data_ptr()  # a view, not a copy
        assert lora_b.data_ptr() == chosen[0][0].layers[layer][1].data_ptr() and float(scales[0]) == 1.0
    weighted = ((b, 0.5),)  # the weight is folded into B once; switching back finds that composition
    first = registry.backend.plan([weighted]).layers[layer]
    registry.backend.plan([((a, 1.0),)])
    again = registry.backend.plan([weighted]).layers[layer]
    assert again[1].data_ptr() == first[1].data_ptr()
    torch.testing.assert_close(first[1][0], b.layers[layer][1] * 0.5 * b.scale)
    registry.merged_budget_bytes = 64 << 20  # merged path: W0 + BA in new tensors, W0 itself untouched
    merged = registry.backend.plan([((a, 1.0),)]).merged
    assert merged and all(weight.data_ptr() not in w0.values() for weight in merged.values())
    assert {n.replace(".base.", "."): p.data_ptr() for n, p in model.unet.named_parameters()} == w0
    for n, p in model.unet.named_parameters():
        assert torch.equal(p, w0_values[n.replace(".base.", ".")])


def test_loading_twice_when_the_timestep_embedding_itself_is_adapted():
    """The shipped adapter wraps time_embedding.linear_1; a second load must still read its shape."""
    from distillery.adapters import AdapterRegistry

    model = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    registry = AdapterRegistry(model)
    registry.load("one", EMBEDDED_ADAPTERS / "guidance-toy")
    registry.load("two", EMBEDDED_ADAPTERS / "guidance-toy")
    assert model.unet.time_embedding.linear_1.in_features == 32
