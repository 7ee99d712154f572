"""Every benchmark's quick mode runs in the suite, so none rots."""

import json
import subprocess
import sys

import pytest

from bench.__main__ import BENCHMARKS


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_quick_mode(name, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", name, "--quick"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert name in proc.stdout
    results = json.loads(open(".bench/results.json").read())
    figures = results[f"{name}_quick"]
    assert all(isinstance(v, (int, float)) for k, v in figures.items() if k != "environment")
