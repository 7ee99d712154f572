"""The lock is in effect: every dependency pinned exactly, installed at its pin, and used by every installer."""

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    return {re.sub(r"[-_.]+", "-", name).lower(): v for name, v in pins.items()}


def test_every_dependency_is_pinned_and_installed_at_its_pin():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    pins = _pins()
    for requirement in wanted:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower()
        assert name in pins, f"{name} is not in constraints.txt (make lock)"
        installed = version(name).split("+")[0]  # torch's local label (+cpu) is the build, not the version
        assert installed == pins[name], f"{name} {installed} is installed, the lock says {pins[name]}"


def test_make_install_and_the_dockerfile_install_with_the_lock():
    makefile, dockerfile = (ROOT / "Makefile").read_text(), (ROOT / "Dockerfile").read_text()
    installs = [line for line in makefile.splitlines() if "$(BIN)/pip install" in line and "--upgrade pip" not in line]
    assert installs and all("-c $(LOCK)" in line for line in installs), installs
    assert "LOCK := constraints.txt" in makefile
    docker_installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert docker_installs and all("-c /tmp/constraints.txt" in line for line in docker_installs), docker_installs
