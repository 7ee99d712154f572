"""Deployment configs checked by the real tools, and each check shown to fail on a broken copy."""

import json
import os
import re
import shlex
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
GRAFANA_PASSWORD = "grafana-" + "fedcba9876543210" * 2  # ... and Grafana without GRAFANA_ADMIN_PASSWORD
COMPOSE_ENV = ("DISTILLERY_API_KEY", "GRAFANA_ADMIN_PASSWORD", "PROMETHEUS_BIND", "GRAFANA_BIND")
COMPOSE_VARIANTS = (["-f", "docker-compose.yml"], ["-f", "docker-compose.yml", "-f", "deploy/docker-compose.cpu.yml"])


def _run(*cmd, cwd=ROOT, api_key: str | None = API_KEY, grafana_password: str | None = GRAFANA_PASSWORD,
         **extra: str) -> subprocess.CompletedProcess:
    """`cmd` with DISTILLERY_API_KEY and GRAFANA_ADMIN_PASSWORD set to these (None: unset) and the compose file's
    other variables only as `extra` gives them, whatever this shell has."""
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_ENV}
    for name, value in (("DISTILLERY_API_KEY", api_key), ("GRAFANA_ADMIN_PASSWORD", grafana_password), *extra.items()):
        if value is not None:
            env[name] = value
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=env)


def _broken_copy(tmp_path, relative: str, old: str, new: str) -> Path:
    """The repo's deploy files (and the Dockerfile) copied under tmp_path with one deliberate mistake in `relative`."""
    for name in ("docker-compose.yml", "deploy", "Dockerfile"):
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
    for variant in COMPOSE_VARIANTS:
        for key in (None, ""):
            result = _run(COMPOSE, *variant, "config", "-q", cwd=root, api_key=key)
            assert result.returncode != 0, (variant, key)
            assert "set DISTILLERY_API_KEY (e.g. openssl rand -hex 32)" in result.stderr, result.stderr
        assert _run(COMPOSE, *variant, "config", "-q", cwd=root).returncode == 0


def test_compose_refuses_to_start_without_a_grafana_password(tmp_path):
    """No default admin/admin: compose makes the operator choose Grafana's admin password (any invocation: compose
    interpolates every service's variables, even for `up server`). Shown failing on a copy with a default."""
    root = _broken_copy(tmp_path, "docker-compose.yml", "services:", "services:")
    for variant in COMPOSE_VARIANTS:
        for password in (None, ""):
            result = _run(COMPOSE, *variant, "config", "-q", cwd=root, grafana_password=password)
            assert result.returncode != 0, (variant, password)
            assert "set GRAFANA_ADMIN_PASSWORD" in result.stderr, result.stderr
        result = _run(COMPOSE, *variant, "config", "--format", "json", cwd=root)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] \
            == GRAFANA_PASSWORD
    (tmp_path / "d").mkdir()
    root = _broken_copy(tmp_path / "d", "docker-compose.yml", "${GRAFANA_ADMIN_PASSWORD:?",
                        "${GRAFANA_ADMIN_PASSWORD:-admin")
    assert _run(COMPOSE, "-f", "docker-compose.yml", "config", "-q", cwd=root, grafana_password=None).returncode == 0


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


# --- Hardening and lifecycle: each property asserted on the repo's files, and each assertion shown to fail on
# a copy where that one property regressed (test_a_regression_fails_its_check).

CACHE_ENV = ("XDG_CACHE_HOME", "HF_HOME", "TRITON_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
             "CUDA_CACHE_PATH", "MPLCONFIGDIR")  # where the libraries write at run time; by default under ~
STARTUP_BUDGET_S = 600  # a real model takes minutes to load and warm up before /healthz answers


def _seconds(duration: str | int | float) -> float:
    """Go's duration text as compose writes it ("2m20s", "1h0m0s", "500ms") or a number, in seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def _dockerfile(root: Path) -> tuple[dict[str, str], str]:
    """The Dockerfile's ENV values and its last USER."""
    lines = [line for line in (root / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    instructions = re.sub(r"\\\n", " ", "\n".join(lines)).splitlines()  # continuation lines joined
    env, user = {}, None
    for instruction in instructions:
        keyword, _, rest = instruction.strip().partition(" ")
        if keyword.upper() == "ENV":
            for word in shlex.split(rest):
                name, _, value = word.partition("=")
                env[name] = value.replace("$PATH", env.get("PATH", "$PATH"))
        elif keyword.upper() == "USER":
            user = rest.strip()
    return env, user


def _settings_names() -> tuple[set[str], float]:
    """The server's settings as environment variables, and its default request timeout."""
    from distillery.serving.config import Settings

    prefix = Settings.model_config["env_prefix"]
    return {prefix + name.upper() for name in Settings.model_fields}, Settings.model_fields["request_timeout_s"].default


def _drain_numbers(env: dict[str, str], grace_s: float, pre_stop_s: float, what: str) -> None:
    """In-flight requests get their full timeout to finish: request timeout <= drain, and pre-stop pause + drain
    fit in the grace period with a margin for the engine's stop and the process's exit."""
    names, default_timeout = _settings_names()
    unknown = {n for n in env if n.startswith("DISTILLERY_")} - names
    assert not unknown, f"{what}: not server settings (a typo is silently ignored): {unknown}"
    timeout = float(env.get("DISTILLERY_REQUEST_TIMEOUT_S", default_timeout))
    assert "DISTILLERY_GRACEFUL_SHUTDOWN_S" in env, f"{what}: no bounded drain"
    drain = float(env["DISTILLERY_GRACEFUL_SHUTDOWN_S"])
    assert drain >= timeout, f"{what}: the drain ({drain} s) cuts requests short of their timeout ({timeout} s)"
    assert grace_s >= pre_stop_s + drain + 5, f"{what}: {grace_s} s grace < {pre_stop_s} s pause + {drain} s drain + 5"


def _pod(root: Path) -> tuple[dict, dict]:
    deployment = yaml.safe_load((root / "deploy/k8s/deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def check_k8s_probes_and_shutdown(root: Path) -> None:
    pod, container = _pod(root)
    startup, ready, live = (container.get(p) for p in ("startupProbe", "readinessProbe", "livenessProbe"))
    assert startup and ready and live, "startup, readiness and liveness probes"
    for probe, path in ((startup, "/healthz"), (ready, "/readyz"), (live, "/healthz")):
        assert probe["httpGet"] == {"path": path, "port": "http"}, probe
        assert probe.get("timeoutSeconds", 1) >= 2, f"{path}: a busy but alive server answers in more than 1 s"
    budget = (startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
              + startup.get("initialDelaySeconds", 0))
    assert budget >= STARTUP_BUDGET_S, f"startupProbe gives the model only {budget} s to load"
    # Once started, a dead engine restarts the pod within a minute; one slow answer does not.
    live_threshold = live.get("failureThreshold", 3)
    assert 2 <= live_threshold and live.get("periodSeconds", 10) * live_threshold <= 60, live
    assert not live.get("initialDelaySeconds") and not ready.get("initialDelaySeconds"), "the startupProbe gates them"
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] in ("sleep", "/bin/sleep", "/usr/bin/sleep") and len(command) == 2, command
    pre_stop = float(command[1])
    assert 5 <= pre_stop <= 30, f"preStop pause {pre_stop} s: the endpoint must be gone before SIGTERM"
    env = {e["name"]: e.get("value") for e in container["env"]}
    _drain_numbers(env, pod["terminationGracePeriodSeconds"], pre_stop, "deployment.yaml")


def check_k8s_security(root: Path) -> None:
    pod, container = _pod(root)
    image_env, image_user = _dockerfile(root)
    assert image_user and re.fullmatch(r"\d+(:\d+)?", image_user), f"USER {image_user}: runAsNonRoot needs a number"
    uid = int(image_user.split(":")[0])
    assert uid != 0
    ctx, sc = pod["securityContext"], container["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == uid, (ctx, uid)
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc.get("runAsUser", uid) == uid and sc.get("runAsNonRoot", True) is True
    assert sc["allowPrivilegeEscalation"] is False and not sc.get("privileged")
    assert sc["capabilities"] == {"drop": ["ALL"]}, sc["capabilities"]
    assert sc["readOnlyRootFilesystem"] is True
    assert pod["enableServiceLinks"] is False, "service links put DISTILLERY_* variables into the server's settings"
    assert pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    models = mounts["/models"]
    assert models.get("readOnly") is True and volumes[models["name"]]["persistentVolumeClaim"].get("readOnly") is True
    writable = [Path(path) for path, m in mounts.items() if "emptyDir" in volumes[m["name"]] and not m.get("readOnly")]
    env = {**image_env, **{e["name"]: e["value"] for e in container["env"] if "value" in e}}
    for name in CACHE_ENV:
        assert name in env, f"{name} unset: the library would write under ~, read-only in the pod"
    for path in ["/tmp", *(env[name] for name in CACHE_ENV)]:
        assert any(Path(path).is_relative_to(w) for w in writable), f"{path} is on the read-only root filesystem"
    (key,) = [e for e in container["env"] if e["name"] == "DISTILLERY_API_KEY"]
    assert "value" not in key and key["valueFrom"]["secretKeyRef"]["optional"] is True, key
    assert key["valueFrom"]["secretKeyRef"]["name"] and key["valueFrom"]["secretKeyRef"]["key"]


def check_compose(root: Path) -> None:
    for variant in COMPOSE_VARIANTS:
        result = _run(COMPOSE, *variant, "config", "--format", "json", cwd=root)
        assert result.returncode == 0, result.stderr
        services = json.loads(result.stdout)["services"]
        # Only the API itself is published on every interface: Prometheus and Grafana are for the host's operator.
        for name in ("prometheus", "grafana"):
            assert services[name]["ports"] and all(p.get("host_ip") == "127.0.0.1" for p in services[name]["ports"]), \
                services[name]["ports"]
        grafana = services["grafana"]["environment"]
        assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false", grafana
        assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == GRAFANA_PASSWORD, "Grafana's password is not the operator's"
        server = services["server"]
        (models,) = [v for v in server["volumes"] if v["target"] == "/models"]
        assert models.get("read_only") is True, models
        check = server["healthcheck"]
        assert "http://127.0.0.1:8000/healthz" in check["test"] and not check.get("disable"), check
        assert _seconds(check["start_period"]) >= STARTUP_BUDGET_S, check
        _drain_numbers(server["environment"], _seconds(server["stop_grace_period"]), 0, f"compose {variant}")
    # The bind addresses stay the operator's choice.
    result = _run(COMPOSE, "-f", "docker-compose.yml", "config", "--format", "json", cwd=root,
                  PROMETHEUS_BIND="0.0.0.0", GRAFANA_BIND="10.0.0.7")
    services = json.loads(result.stdout)["services"]
    ports = services["prometheus"]["ports"] + services["grafana"]["ports"]
    assert [p["host_ip"] for p in ports] == ["0.0.0.0", "10.0.0.7"], ports


CHECKS = {"k8s_probes_and_shutdown": check_k8s_probes_and_shutdown, "k8s_security": check_k8s_security,
          "compose": check_compose}


@pytest.mark.parametrize("check", CHECKS)
def test_deploy_property_holds(check):
    CHECKS[check](ROOT)


K8S, DOCKERFILE, COMPOSE_FILE = "deploy/k8s/deployment.yaml", "Dockerfile", "docker-compose.yml"
REGRESSIONS = {  # id: (check, file, text, replaced by)
    "readiness_on_healthz": ("k8s_probes_and_shutdown", K8S, "path: /readyz", "path: /healthz"),
    "no_startup_probe": ("k8s_probes_and_shutdown", K8S, "startupProbe:", "startupProbe_:"),
    "short_startup_budget": ("k8s_probes_and_shutdown", K8S, "failureThreshold: 90", "failureThreshold: 6"),
    "liveness_on_readyz": ("k8s_probes_and_shutdown", K8S, "livenessProbe:\n            httpGet: {path: /healthz",
                           "livenessProbe:\n            httpGet: {path: /readyz"),
    "liveness_initial_delay": ("k8s_probes_and_shutdown", K8S, "livenessProbe:\n",
                               "livenessProbe:\n            initialDelaySeconds: 30\n"),
    "default_grace": ("k8s_probes_and_shutdown", K8S, "terminationGracePeriodSeconds: 150",
                      "terminationGracePeriodSeconds: 30"),
    "drain_past_grace": ("k8s_probes_and_shutdown", K8S, 'DISTILLERY_GRACEFUL_SHUTDOWN_S, value: "125"',
                         'DISTILLERY_GRACEFUL_SHUTDOWN_S, value: "140"'),
    "drain_below_timeout": ("k8s_probes_and_shutdown", K8S, 'DISTILLERY_GRACEFUL_SHUTDOWN_S, value: "125"',
                            'DISTILLERY_GRACEFUL_SHUTDOWN_S, value: "60"'),
    "timeout_above_drain": ("k8s_probes_and_shutdown", K8S, 'DISTILLERY_REQUEST_TIMEOUT_S, value: "120"',
                            'DISTILLERY_REQUEST_TIMEOUT_S, value: "300"'),
    "misspelt_setting": ("k8s_probes_and_shutdown", K8S, "DISTILLERY_REQUEST_TIMEOUT_S,",
                         "DISTILLERY_REQUEST_TIMEOUT,"),
    "no_pre_stop_pause": ("k8s_probes_and_shutdown", K8S, 'command: [sleep, "10"]', 'command: [sleep, "0"]'),
    "privilege_escalation": ("k8s_security", K8S, "allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true"),
    "capabilities_kept": ("k8s_security", K8S, "capabilities: {drop: [ALL]}", "capabilities: {drop: [NET_RAW]}"),
    "writable_root": ("k8s_security", K8S, "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false"),
    "seccomp_unconfined": ("k8s_security", K8S, "seccompProfile: {type: RuntimeDefault}",
                           "seccompProfile: {type: Unconfined}"),
    "pod_runs_as_root": ("k8s_security", K8S, "runAsUser: 10001", "runAsUser: 0"),
    "models_writable": ("k8s_security", K8S, "mountPath: /models, readOnly: true", "mountPath: /models"),
    "api_key_secret_required": ("k8s_security", K8S, "optional: true", "optional: false"),
    "api_key_literal": ("k8s_security", K8S,
                        "valueFrom:\n                secretKeyRef: "
                        "{name: distillery-api-key, key: api-key, optional: true}",
                        "value: changeme"),
    "service_links": ("k8s_security", K8S, "enableServiceLinks: false", "enableServiceLinks: true"),
    "no_cache_mount": ("k8s_security", K8S, "mountPath: /var/cache/distillery}", "mountPath: /var/cache/other}"),
    "no_tmp_mount": ("k8s_security", K8S, "{name: tmp, mountPath: /tmp}", "{name: tmp, mountPath: /scratch}"),
    "cache_outside_mount": ("k8s_security", DOCKERFILE, "TORCHINDUCTOR_CACHE_DIR=/var/cache/distillery/torchinductor",
                            "TORCHINDUCTOR_CACHE_DIR=/opt/torchinductor"),
    "cache_in_home": ("k8s_security", DOCKERFILE, "    HF_HOME=/var/cache/distillery/huggingface \\\n", ""),
    "named_user": ("k8s_security", DOCKERFILE, "USER 10001:10001", "USER distillery"),
    "prometheus_public": ("compose", COMPOSE_FILE, '"${PROMETHEUS_BIND:-127.0.0.1}:9090:9090"', '"9090:9090"'),
    "grafana_public": ("compose", COMPOSE_FILE, '"${GRAFANA_BIND:-127.0.0.1}:3000:3000"', '"0.0.0.0:3000:3000"'),
    "grafana_anonymous": ("compose", COMPOSE_FILE, 'GF_AUTH_ANONYMOUS_ENABLED: "false"',
                          'GF_AUTH_ANONYMOUS_ENABLED: "true"'),
    "grafana_default_password": ("compose", COMPOSE_FILE, "GF_SECURITY_ADMIN_PASSWORD: ${GRAFANA_ADMIN_PASSWORD:?",
                                 "GF_SECURITY_ADMIN_PASSWORD: admin\n      X: ${GRAFANA_ADMIN_PASSWORD:?"),
    "compose_models_writable": ("compose", COMPOSE_FILE, "models:/models:ro", "models:/models"),
    "compose_short_grace": ("compose", COMPOSE_FILE, "stop_grace_period: 140s", "stop_grace_period: 10s"),
    "compose_no_drain": ("compose", COMPOSE_FILE, 'DISTILLERY_GRACEFUL_SHUTDOWN_S: "125"',
                         'X_GRACEFUL_SHUTDOWN_S: "125"'),
    "compose_short_start": ("compose", COMPOSE_FILE, "start_period: 600s", "start_period: 60s"),
    "compose_health_elsewhere": ("compose", COMPOSE_FILE, "http://127.0.0.1:8000/healthz", "http://127.0.0.1:8000/"),
    "cpu_variant_undoes_it": ("compose", "deploy/docker-compose.cpu.yml", "DISTILLERY_DEVICE: cpu",
                              "DISTILLERY_DEVICE: cpu\n    volumes: !override [models:/models]"),
}


@pytest.mark.parametrize("regression", REGRESSIONS)
def test_a_regression_fails_its_check(tmp_path, regression):
    check, relative, old, new = REGRESSIONS[regression]
    root = _broken_copy(tmp_path, relative, old, new)
    with pytest.raises(AssertionError):
        CHECKS[check](root)
