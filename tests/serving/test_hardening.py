"""No client can starve or crash the server: bounded work and bodies, no 500 from anything sent, a queue that
aborted requests cannot hold, a drain on SIGTERM. Over HTTP against a live `distillery serve`."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from distillery.testing.launch import READY_LINE, _wait_for_line, free_port

pytestmark = pytest.mark.heavy


def _post(url: str, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=timeout)


def test_a_body_over_the_limit_is_413_before_parsing_in_each_apis_shape(running_server):
    big = b'{"prompt": "' + b"x" * (2 << 20) + b'"}'
    native = httpx.post(f"{running_server}/generate", content=big, headers={"content-type": "application/json"})
    assert native.status_code == 413 and "at most 1048576 bytes" in native.json()["detail"]
    chunked = httpx.post(f"{running_server}/generate", content=iter([big[:1 << 20], big[1 << 20:]]),
                         headers={"content-type": "application/json"})  # no Content-Length: counted as read
    assert chunked.status_code == 413
    openai = httpx.post(f"{running_server}/v1/images/generations", content=big,
                        headers={"content-type": "application/json"})
    assert openai.status_code == 413 and "at most" in openai.json()["error"]["message"]
    a1111 = httpx.post(f"{running_server}/sdapi/v1/txt2img", content=big, headers={"content-type": "application/json"})
    assert a1111.status_code == 413 and a1111.json()["error"] == "PayloadTooLarge"


def test_errors_echo_only_a_short_prefix_of_the_input(running_server):
    resp = _post(running_server, "/generate", {"prompt": "x" * 5000})
    echoed = resp.json()["detail"][0]["input"]
    assert resp.status_code == 422 and len(echoed) < 120 and echoed.endswith("(5000 characters)")


@pytest.mark.parametrize("comments", [{"a": "\udcff"}, {"\udcff": 1}, "deep"])
def test_a1111_echoes_never_fail_the_answer(running_server, comments):
    if comments == "deep":
        comments = {}
        inner = comments
        for _ in range(600):
            inner["a"] = {}
            inner = inner["a"]
    body = {"prompt": "a red circle", "steps": 2, "width": 32, "height": 32, "comments": comments}
    resp = httpx.post(f"{running_server}/sdapi/v1/txt2img", content=json.dumps(body),  # escapes: \udcff as sent
                      headers={"content-type": "application/json"}, timeout=120)
    assert resp.status_code == 200, resp.text[:300]
    assert resp.json()["parameters"]["comments"] is None and len(resp.json()["images"]) == 1


@pytest.mark.parametrize("path, body", [
    ("/generate", {"prompt": "x", "adapters": [{"name": "stripes-toy", "weight": 2}, {"name": "stripes-toy",
                                                                                      "weight": 2}]}),
    ("/v1/images/generations", {"prompt": "x <lora:stripes-toy:2>", "model": "stripes-toy"}),
    ("/sdapi/v1/txt2img", {"prompt": "x <lora:stripes-toy:1> <lora:stripes-toy:1>"}),
])
def test_the_same_adapter_twice_is_422_naming_it(running_server, path, body):
    resp = _post(running_server, path, body)
    assert resp.status_code in (400, 422), resp.text  # OpenAI answers invalid fields 400
    assert "stripes-toy" in resp.text and ("more than once" in resp.text or "each NAME once" in resp.text)


def test_work_per_request_is_capped_naming_the_field_and_the_limit(running_server):
    resp = _post(running_server, "/generate", {"prompt": "x", "n": 10, "width": 64, "height": 64, "steps": 100,
                                               "response_format": "json"})
    assert resp.status_code == 422 and resp.json()["detail"][0]["field"] == "n"
    assert "at most 2000" in resp.json()["detail"][0]["message"]
    steps = _post(running_server, "/generate", {"prompt": "x", "steps": 151})
    assert steps.status_code == 422 and "[1, 150]" in steps.text
    a1111 = _post(running_server, "/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 10, "n_iter": 10})
    assert a1111.status_code == 422 and "at most 2000" in a1111.text
    assert a1111.json()["detail"][0]["field"] == "batch_size"


def _metric(url: str, name: str) -> float:
    [line] = [line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith(f"{name} ")]
    return float(line.split()[-1])


def test_aborted_large_requests_cannot_lock_out_a_small_one(running_server):
    small = {"prompt": "a red circle", "steps": 4, "seed": 1}
    _post(running_server, "/generate", small)  # warm
    t0 = time.perf_counter()
    assert _post(running_server, "/generate", small).status_code == 200
    solo = time.perf_counter() - t0

    biggest = {"prompt": "a blue square", "n": 10, "width": 64, "height": 64, "steps": 25, "response_format": "json"}
    hog = threading.Thread(target=_post, args=(running_server, "/generate", biggest, 300), daemon=True)
    evaluated = _metric(running_server, "distillery_unet_evaluations_total")
    hog.start()
    try:
        deadline = time.monotonic() + 30
        while _metric(running_server, "distillery_unet_evaluations_total") == evaluated:  # until the hog steps
            assert time.monotonic() < deadline, "the hog never started stepping"
            time.sleep(0.02)
        for _ in range(4):  # large requests whose clients give up while they wait
            with pytest.raises(httpx.TimeoutException):
                _post(running_server, "/generate", {**biggest, "n": 3}, timeout=0.3)
        t0 = time.perf_counter()
        resp = _post(running_server, "/generate", small)
        waited = time.perf_counter() - t0
        assert resp.status_code == 200, resp.text
        assert waited < 8 * solo + 2.0, f"{waited:.2f} s beside the hog; {solo:.2f} s alone"
        assert _metric(running_server, "distillery_queue_depth") <= 10  # the aborted ones left: the hog's images wait
    finally:
        # The server is shared by the session: the hog must not go on eating CPU under the tests after this one
        # (it once made the next test's own server step 15x slower and miss its drain bound).
        hog.join(timeout=300)


def test_sigterm_drains_the_request_in_flight_then_exits_within_the_bound():
    port = free_port()
    env = {**os.environ, "DISTILLERY_GRACEFUL_SHUTDOWN_S": "60"}
    proc = subprocess.Popen([sys.executable, "-m", "distillery.cli", "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        seen_loading = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # /healthz answers while the model loads, /readyz says not yet
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    seen_loading = httpx.get(f"{url}/readyz", timeout=2).status_code == 503
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        assert seen_loading, "the server listened only once the model was ready"
        _wait_for_line(proc, READY_LINE, 60)
        threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()
        events = []
        with httpx.stream("POST", f"{url}/generate/stream", json={"prompt": "x", "steps": 30}, timeout=120) as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    events.append(line.split(":", 1)[1].strip())
                if events == ["progress"]:  # the request is in flight: stop the server now
                    t0 = time.monotonic()
                    proc.send_signal(signal.SIGTERM)
                    try:
                        late = httpx.post(f"{url}/generate", json={"prompt": "x", "steps": 2}, timeout=10).status_code
                    except httpx.TransportError:
                        late = "refused"
                    assert late in (503, "refused")
        assert events[-1] == "result" and events.count("progress") == 30  # the request in flight was answered
        # uvicorn re-raises the signal once drained: the exit status says SIGTERM
        assert proc.wait(timeout=65) in (0, -signal.SIGTERM) and time.monotonic() - t0 < 65
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
