"""Deployment configs checked by the real tools, and each check shown to fail on a broken copy."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import compose
import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = Path(compose.__file__).parent / "docker-compose"  # the binary: the Python wrapper always exits 0
K8S_CORE = ["deployment.yaml", "service.yaml", "hpa.yaml", "pvc.yaml"]
API_KEY = "0123456789abcdef" * 4  # compose refuses to start the server without DISTILLERY_API_KEY


def _run(*cmd, cwd=ROOT, api_key: str | None = API_KEY) -> subprocess.CompletedProcess:
    """`cmd` with DISTILLERY_API_KEY set to `api_key` (None: unset), whatever this shell has."""
    env = {k: v for k, v in os.environ.items() if k != "DISTILLERY_API_KEY"}
    if api_key is not None:
        env["DISTILLERY_API_KEY"] = api_key
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=env)


def _broken_copy(tmp_path, relative: str, old: str, new: str) -> Path:
    """The repo's deploy files copied under tmp_path with one deliberate mistake in `relative`."""
    for name in ("docker-compose.yml", "deploy"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    target = tmp_path / relative
    text = target.read_text()
    assert old in text, f"{old!r} not in {relative}"
    target.write_text(text.replace(old, new, 1))
    return tmp_path


def test_compose_config_is_valid_for_gpu_and_cpu_variants():
    assert _run(COMPOSE, "-f", "docker-compose.yml", "config", "-q").returncode == 0
    cpu = _run(COMPOSE, "-f", "docker-compose.yml", "-f", "deploy/docker-compose.cpu.yml", "config", "--format", "json")
    assert cpu.returncode == 0, cpu.stderr
    server = json.loads(cpu.stdout)["services"]["server"]
    assert "deploy" not in server and server["environment"]["DISTILLERY_DEVICE"] == "cpu"
    gpu = json.loads(_run(COMPOSE, "-f", "docker-compose.yml", "config", "--format", "json").stdout)
    assert gpu["services"]["server"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert gpu["services"]["server"]["environment"]["DISTILLERY_API_KEY"] == server["environment"]["DISTILLERY_API_KEY"] \
        == API_KEY


def test_compose_refuses_to_start_without_an_api_key(tmp_path):
    """Admin routes are closed without a key (403); compose makes the operator choose one. A copy: no .env there."""
    root = _broken_copy(tmp_path, "docker-compose.yml", "services:", "services:")  # an unchanged copy
    for variant in (["-f", "docker-compose.yml"], ["-f", "docker-compose.yml", "-f", "deploy/docker-compose.cpu.yml"]):
        for key in (None, ""):
            result = _run(COMPOSE, *variant, "config", "-q", cwd=root, api_key=key)
            assert result.returncode != 0, (variant, key)
            assert "set DISTILLERY_API_KEY (e.g. openssl rand -hex 32)" in result.stderr, result.stderr
        assert _run(COMPOSE, *variant, "config", "-q", cwd=root).returncode == 0


def test_broken_compose_fails(tmp_path):
    root = _broken_copy(tmp_path, "docker-compose.yml", "ports: [\"8000:8000\"]", "portz: [\"8000:8000\"]")
    assert _run(COMPOSE, "-f", "docker-compose.yml", "config", "-q", cwd=root).returncode != 0


def test_prometheus_config_and_rules():
    assert _run("promtool", "check", "config", "deploy/prometheus.yml").returncode == 0
    result = _run("promtool", "test", "rules", "rules_test.yml", cwd=ROOT / "deploy" / "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_broken_prometheus_config_and_rules_fail(tmp_path):
    root = _broken_copy(tmp_path, "deploy/prometheus.yml", "scrape_interval: 5s", "scrape_interval: often")
    assert _run("promtool", "check", "config", "deploy/prometheus.yml", cwd=root).returncode != 0
    (tmp_path / "r").mkdir()
    root = _broken_copy(tmp_path / "r", "deploy/rules.yml", "distillery_queue_depth > 8", "distillery_queue_depth > 80")
    assert _run("promtool", "test", "rules", "rules_test.yml", cwd=root / "deploy" / "tests").returncode != 0


def test_k8s_manifests_validate():
    result = _run(Path(sys.executable).parent / "kubernetes-validate", "--strict", "--quiet",
                  *[f"deploy/k8s/{m}" for m in K8S_CORE])
    assert result.returncode == 0, result.stdout + result.stderr
    schema = json.loads((ROOT / "deploy/tests/servicemonitor.schema.json").read_text())
    jsonschema.validate(yaml.safe_load((ROOT / "deploy/k8s/servicemonitor.yaml").read_text()), schema)


def test_broken_k8s_manifests_fail(tmp_path):
    root = _broken_copy(tmp_path, "deploy/k8s/deployment.yaml", "containerPort: 8000", "containerPort: eight")
    result = _run(Path(sys.executable).parent / "kubernetes-validate", "--strict", "--quiet",
                  "deploy/k8s/deployment.yaml", cwd=root)
    assert result.returncode != 0
    (tmp_path / "m").mkdir()
    root = _broken_copy(tmp_path / "m", "deploy/k8s/servicemonitor.yaml", "interval: 15s", "interval: soon")
    schema = json.loads((root / "deploy/tests/servicemonitor.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(yaml.safe_load((root / "deploy/k8s/servicemonitor.yaml").read_text()), schema)


def test_grafana_dashboard_queries_only_known_metrics():
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/distillery.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    documented = (ROOT / "docs/metrics.md").read_text()
    rules = (ROOT / "deploy/rules.yml").read_text()
    for expr in exprs:
        names = [word for word in expr.replace("(", " ").replace("[", " ").replace("{", " ").split() if word.startswith("distillery")]
        for name in names:
            base = name.removesuffix("_bucket").removesuffix("_total")
            assert base in documented or name in rules, name
