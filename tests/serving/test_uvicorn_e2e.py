"""The real app under uvicorn on a loopback port, driven over a socket like a user would."""

import asyncio
import io
import time

import httpx
import pytest
from PIL import Image

from distillery.testing.launch import serve_subprocess

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server_url(running_server):
    return running_server


def test_generate_over_http(server_url):
    resp = httpx.post(f"{server_url}/generate", json={"prompt": "a yellow triangle", "steps": 5, "seed": 1}, timeout=60)
    assert resp.status_code == 200
    image = Image.open(io.BytesIO(resp.content))
    image.verify()
    assert resp.headers["x-steps"] == "5"


def test_bad_request_then_good_request_over_http(server_url):
    bad = httpx.post(f"{server_url}/generate", json={"prompt": "x", "steps": 5000}, timeout=10)
    assert bad.status_code == 422 and "[1, 1000]" in bad.json()["detail"][0]["message"]
    good = httpx.post(f"{server_url}/generate", json={"prompt": "", "steps": 2}, timeout=60)
    assert good.status_code == 200 and good.content[:8] == b"\x89PNG\r\n\x1a\n"


def _cancelled_count(server_url) -> float:
    text = httpx.get(f"{server_url}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("distillery_request_latency_seconds_count") and 'outcome="cancelled"' in line)


def test_client_that_goes_away_cancels_its_work(server_url):
    before = _cancelled_count(server_url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server_url}/generate", json={"prompt": "a red circle", "steps": 150}, timeout=0.5)
    deadline = time.monotonic() + 30
    while _cancelled_count(server_url) == before:  # dropped at its next step, long before its 150th
        assert time.monotonic() < deadline, "the abandoned request was not cancelled"
    ok = httpx.post(f"{server_url}/generate", json={"prompt": "x", "steps": 2}, timeout=60)
    assert ok.status_code == 200


@pytest.fixture(scope="module")
def deterministic_url():
    with serve_subprocess(env={"DISTILLERY_DETERMINISTIC": "1"}) as url:
        yield url


def test_same_png_bytes_alone_and_among_concurrent_requests(deterministic_url):
    """Deterministic mode, over the socket: a request's PNG is byte-identical whether it runs alone or
    beside others (other sizes, schedulers, modes)."""
    from concurrent.futures import ThreadPoolExecutor

    server_url = deterministic_url
    probe = {"prompt": "a small red circle", "guidance": 2.0, "steps": 8, "seed": 5,
             "adapters": [{"name": "guidance-toy"}]}
    others = [{"prompt": "a blue square", "steps": 8, "seed": s, "guidance": 1.0 + s, "width": 24 + 16 * s,
               "scheduler": ["ddim", "euler", "dpm"][s]} for s in range(3)]

    def post(body):
        resp = httpx.post(f"{server_url}/generate", json=body, timeout=120)
        assert resp.status_code == 200
        return resp.content

    alone = post(probe)
    assert post({**probe, "prompt": "a large green square"}) != alone  # same seed, other prompt: another image
    shared_before = _calls_over_two_rows(server_url)
    with ThreadPoolExecutor(4) as pool:
        crowd = list(pool.map(post, others + [probe]))
    assert crowd[-1] == alone
    assert len(set(crowd)) == len(crowd)  # a server answering one constant image fails here
    assert _calls_over_two_rows(server_url) > shared_before  # requests really shared UNet calls


def _calls_over_two_rows(server_url) -> float:
    text = httpx.get(f"{server_url}/metrics", timeout=5).text
    value = {line.split()[0]: float(line.split()[-1]) for line in text.splitlines() if line.startswith("distillery_batch_rows")}
    return value["distillery_batch_rows_count"] - value['distillery_batch_rows_bucket{le="2.0"}']


def test_full_queue_answers_429_with_retry_after_over_http():
    """A server with room for one waiting request, flooded: the overflow gets 429 with a positive integer
    Retry-After, everything else a 200 with a PNG, and the server serves on afterwards."""
    flood, steps = 8, 20  # 20 CFG steps take ~1 s here, the 8 requests arrive within ~0.1 s: they overlap

    async def burst(url):
        async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
            return await asyncio.gather(*(client.post(f"{url}/generate", json={
                "prompt": "a red circle", "guidance": 2.0, "steps": steps, "seed": i}) for i in range(flood)))

    with serve_subprocess(ready_within_s=120, env={"DISTILLERY_QUEUE_SIZE": "1", "DISTILLERY_MAX_BATCH_ROWS": "2"}) as url:
        answers = asyncio.run(burst(url))
        after = httpx.post(f"{url}/generate", json={"prompt": "a blue square", "steps": 2}, timeout=120)
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 429}, [(r.status_code, r.text[:200]) for r in answers]
    assert statuses.count(429) >= 1 and statuses.count(200) >= 1, statuses
    for r in answers:
        if r.status_code == 429:
            retry_after = r.headers.get("retry-after", "")
            assert retry_after.isdigit() and int(retry_after) > 0, retry_after
        else:
            assert r.content.startswith(PNG_MAGIC) and Image.open(io.BytesIO(r.content)).size == (32, 32)
    assert after.status_code == 200 and after.content.startswith(PNG_MAGIC)
