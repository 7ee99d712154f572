"""Distillers under `accelerate launch` with 2 CPU processes (gloo): ranks stay in sync."""

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("command, options, written", [
    ("distill-guidance", ["--rank", "4"], "adapter.json"),
    ("prune", ["--level", "2"], "pruning.json"),
])
def test_two_processes_hold_the_same_student(random_toy_folder, tmp_path, command, options, written):
    accelerate = Path(sys.executable).parent / "accelerate"
    # --multi_gpu on a machine without one: torchrun starts the 2 processes, accelerate picks MULTI_CPU + gloo
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "distillery.cli", command,
           "--model", str(random_toy_folder), "--data", "toy:64", "--steps", "3", "--batch", "4", *options,
           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--checkpoint-every", "100"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1",
                            "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    sums = dict(re.findall(r"rank (\d)/2 trainable checksum ([0-9.]+e[+-][0-9]+)", result.stdout))
    assert set(sums) == {"0", "1"}, result.stdout[-2000:]
    assert sums["0"] == sums["1"]
    assert float(sums["0"]) > 0 and (tmp_path / "out" / written).exists()
