"""A real Prometheus server scrapes a running distillery server; the memory series arrive."""

import shutil
import subprocess
import time

import httpx
import pytest

from distillery.testing.launch import free_port


@pytest.fixture
def prometheus(running_server, tmp_path):
    target = running_server.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: distillery\n"
                      f"    static_configs:\n      - targets: ['{target}']\n")
    port = free_port()
    proc = subprocess.Popen([shutil.which("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'db'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_memory_metrics_arrive_in_prometheus(prometheus, running_server):
    assert httpx.post(f"{running_server}/generate", json={"prompt": "a red circle", "steps": 2}, timeout=60).status_code == 200
    deadline = time.monotonic() + 60
    series = []
    while not series:
        assert time.monotonic() < deadline, "no distillery memory series in Prometheus within 60 s"
        try:
            resp = httpx.get(f"{prometheus}/api/v1/query", params={"query": "distillery_device_memory_bytes"}, timeout=2)
            series = resp.json()["data"]["result"]
        except (httpx.TransportError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    kinds = {s["metric"]["kind"] for s in series}
    assert kinds == {"allocated", "reserved", "peak"}
    assert all(float(s["value"][1]) > 0 for s in series)
    up = httpx.get(f"{prometheus}/api/v1/query", params={"query": "up{job='distillery'}"}, timeout=2).json()
    assert up["data"]["result"][0]["value"][1] == "1"
