"""Every benchmark's quick mode runs in the suite, so none rots. Figures go to a temporary results
file, never the repository's .bench/results.json."""

import json
import subprocess
import sys

import pytest

from bench.__main__ import BENCHMARKS, skip_reason


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
    monkeypatch.setattr(bench_main.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
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
