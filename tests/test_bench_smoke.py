"""Every benchmark's quick mode runs in the suite, so none rots. Figures go to a temporary results
file, never the repository's .bench/results.json."""

import importlib
import json
import math
import os
import subprocess
import sys

import pytest

from bench.__main__ import BENCHMARKS, GROUPS, skip_reason


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.skipif(skip_reason(name) is not None,
                                                                               reason=str(skip_reason(name))))
                                  for name in BENCHMARKS])
def test_benchmark_quick_mode(name, tmp_path):
    results_file = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "bench", name, "--quick", "--results", str(results_file)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert name in proc.stdout
    figures = json.loads(results_file.read_text())[f"{name}_quick"]
    assert all(isinstance(v, (int, float)) for k, v in figures.items() if k != "environment")
    if name == "soak":  # a load test that tolerated failures would pass a broken server
        assert figures["ok"] > 0 and figures["failures"] == 0, proc.stdout[-3000:]


def test_results_file_follows_the_flag_then_the_environment(tmp_path, monkeypatch, capsys):
    """`--results` wins over $DISTILLERY_BENCH_RESULTS, which wins over .bench/results.json; the
    one-process-per-benchmark runs get the same file; a skipped benchmark records nothing."""
    import bench.__main__ as bench_main

    calls = []
    monkeypatch.setattr(bench_main.subprocess, "run",
                        lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setenv(bench_main.RESULTS_ENV, str(tmp_path / "env.json"))
    bench_main.main(["swap", "soak"])
    bench_main.main(["swap", "soak", "--results", str(tmp_path / "flag.json")])
    monkeypatch.delenv(bench_main.RESULTS_ENV)
    bench_main.main(["swap", "soak", "--quick"])
    chosen = [cmd[cmd.index("--results") + 1] for cmd in calls]
    assert chosen == [str(tmp_path / "env.json")] * 2 + [str(tmp_path / "flag.json")] * 2 + [".bench/results.json"] * 2
    assert [cmd[3] for cmd in calls[:2]] == ["swap", "soak"] and calls[-1][-1] == "--quick"

    monkeypatch.setattr(bench_main.torch.cuda, "is_available", lambda: False)
    bench_main.main(["lora_kernel_gpu", "--results", str(tmp_path / "skipped.json")])
    assert "lora_kernel_gpu: SKIPPED" in capsys.readouterr().out
    assert not (tmp_path / "skipped.json").exists()


def test_the_gpu_group_runs_the_gpu_suite_and_forwards_its_flags(monkeypatch):
    """`python -m bench gpu` is exactly the GPU suite, one process each; a failing one does not stop the rest
    (a GPU session is short) but fails the run; --device belongs to the GPU suite, cpu only with --quick."""
    import bench.__main__ as bench_main

    calls = []
    monkeypatch.setattr(bench_main.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(
        cmd, int(cmd[3] == "gpu_unet_step")))
    with pytest.raises(SystemExit, match="gpu_unet_step"):
        bench_main.main(["gpu", "--device", "cuda", "--results", "r.json"])
    assert [cmd[3] for cmd in calls] == GROUPS["gpu"] and all(cmd[-2:] == ["--device", "cuda"] for cmd in calls)
    assert all(importlib.import_module(f"bench.{name}").NEEDS_CUDA for name in GROUPS["gpu"])
    assert set(GROUPS["gpu"]) <= set(BENCHMARKS)
    for argv in (["gpu", "--device", "cpu"], ["swap", "--device", "cpu", "--quick"]):
        with pytest.raises(SystemExit):
            bench_main.main(argv)


def test_gpu_suite_cpu_smoke(tmp_path):
    """The GPU suite's code on the CPU (toy model, fp32, 1-2 steps), all in one process, so it cannot rot where
    CI has no GPU; recorded as <name>_cpu_smoke, never as GPU figures. Same components, same adapter and same
    initial latents: distillery and stock diffusers make the same image."""
    results_file = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "gpu", "--device", "cpu", "--quick", "--results",
                           str(results_file)], check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CPU smoke: NOT GPU figures" in proc.stdout and "lora_kernel_gpu: SKIPPED" in proc.stdout
    results = json.loads(results_file.read_text())
    smoke = [name for name in GROUPS["gpu"] if getattr(importlib.import_module(f"bench.{name}"), "CPU_SMOKE", False)]
    assert sorted(results) == sorted(f"{name}_cpu_smoke" for name in smoke)
    for name in smoke:
        figures = results[f"{name}_cpu_smoke"]
        assert figures["environment"]["suite"].startswith("cpu smoke") and figures["environment"]["dtype"] == "float32"
        assert all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
                   for k, v in figures.items() if k != "environment"), figures
    headline = {"gpu_unet_step": ["fused_over_base", "merged_over_base", "peft_over_base"],
                "gpu_adapter_switch": ["switch_over_set_adapters"], "gpu_single_eval": ["single_eval_over_cfg", "limit"],
                "gpu_throughput": ["throughput_8_clients"], "gpu_vs_diffusers": ["vs_diffusers"]}
    for name, keys in headline.items():
        assert all(results[f"{name}_cpu_smoke"][k] > 0 for k in keys), (name, keys)
    assert results["gpu_single_eval_cpu_smoke"]["limit"] < 1
    assert results["gpu_vs_diffusers_cpu_smoke"]["image_max_diff"] <= 2  # of 255: the same image
