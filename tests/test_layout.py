"""The package's layout holds: one installed package, imports that run one way, a server without training code."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "distillery"

# Which rooms each room may import (a leaf module is a room of its own). `cli` and `testing` sit above all.
MAY_IMPORT = {
    "paths": set(),
    "atomic": set(),
    "kernels": set(),
    "model": set(),
    "adapters": {"atomic", "kernels", "model"},
    "sampling": {"adapters", "kernels", "model"},
    "serving": {"adapters", "kernels", "model", "paths", "sampling"},
    "distill": {"adapters", "atomic", "model", "paths", "sampling"},
}
TRAINING_ONLY = {"accelerate", "peft", "torchmetrics"}  # third-party libraries only the distillers need


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function (lazy imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _room(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_imports_run_one_way():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        room = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if room not in MAY_IMPORT:
            continue
        for module in _imports(path):
            target = _room(module) if module.startswith("distillery.") else None
            if target and target != room and target not in MAY_IMPORT[room]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
            if room != "distill" and module.split(".")[0] in TRAINING_ONLY and path.name != "files.py":
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports training-only {module}")
    assert not wrong, "\n".join(wrong)


def test_files_are_short_and_say_what_they_hold():
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        assert len(text.splitlines()) <= 400, f"{path}: {len(text.splitlines())} lines"
        assert text.startswith('"""'), f"{path} does not open with a line on what it holds"


SERVE_PROBE = """
import sys, uvicorn
from fastapi.testclient import TestClient

def run(target, factory, **kw):  # what uvicorn would serve, started in-process
    module, name = target.split(":")
    with TestClient(getattr(__import__(module, fromlist=[name]), name)()) as client:
        import time
        deadline = time.monotonic() + 240  # the model loads behind the live socket
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "not ready in time"
            time.sleep(0.1)
uvicorn.run = run

from distillery.cli import main
main(["serve"])
print(" ".join(sorted(sys.modules)))
"""


def test_distillery_serve_loads_no_training_code(tmp_path):
    out = subprocess.run([sys.executable, "-c", SERVE_PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = out.stdout.split()
    assert "distillery.serving.engine" in loaded  # the probe did start the server
    assert not [m for m in loaded if m.startswith(("distillery.distill", "distillery.testing"))], loaded


def test_pip_install_target_holds_only_distillery(tmp_path):
    source, target = tmp_path / "source", tmp_path / "site"  # a copy: setuptools writes build/ beside the source
    shutil.copytree(PACKAGE.parent, source, ignore=shutil.ignore_patterns(
        ".*", "build", "*.egg-info", "__pycache__", "models", "tests", "bench", "deploy", "docs"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(source)], check=True, capture_output=True, timeout=300)
    top = sorted(p.name for p in target.iterdir())
    assert [n for n in top if n not in ("bin", "distillery")] == [n for n in top if n.endswith(".dist-info")], top
    assert len(top) == 3 and (target / "bin" / "distillery").exists(), top
    packages = sorted(str(p.parent.relative_to(target)) for p in (target / "distillery").rglob("__init__.py"))
    assert packages == sorted(str(p.parent.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("__init__.py"))


ROUTES = PACKAGE / "serving" / "routes"
ROUTES_MAY_IMPORT = ("distillery.serving.", "distillery.sampling.plan")  # the serving layer and the plan's names
ENGINE_INSIDES = {"registry", "admission", "stepping", "active", "pending", "denoising"}


def test_routes_touch_no_registry_or_engine_internals():
    """Routes map requests to Jobs and answers: what they need of the engine, it exposes (engine.py's docstring)."""
    wrong = []
    for path in sorted(ROUTES.glob("*.py")):
        tree = ast.parse(path.read_text())
        for module in _imports(path):
            if module.startswith("distillery.") and not module.startswith(ROUTES_MAY_IMPORT):
                wrong.append(f"{path.name} imports {module}")
            if module in ("distillery.serving.admission", "distillery.serving.stepping"):
                wrong.append(f"{path.name} imports the engine's insides: {module}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and (node.attr in ENGINE_INSIDES or
                                                     node.attr.startswith("_") and not node.attr.startswith("__")):
                wrong.append(f"{path.name}:{node.lineno} reaches into .{node.attr}")
    assert not wrong, "\n".join(wrong)
