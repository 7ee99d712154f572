"""Run benchmarks, print a table each, merge figures into a results file (default .bench/results.json).

The results file: `--results PATH`, else $DISTILLERY_BENCH_RESULTS, else .bench/results.json.
A benchmark module with NEEDS_CUDA = True is skipped (nothing recorded) where there is no CUDA.
A group name selects several: `python -m bench gpu` runs the GPU suite (docs/gpu_benchmarks.md).
`--device cpu --quick` runs the GPU suite's modules that have a CPU smoke path (CPU_SMOKE = True) on the
CPU, all in one process, recorded as `<name>_cpu_smoke`: a check that their code runs, never GPU figures.
A benchmark may return a "setup" dict (device, dtype, versions): it is recorded with the environment.
Several benchmarks in one run share their evaluation renders and FID reference (bench/references.py: a
folder under .bench/ for the run, deleted at its end).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import REFERENCES_ENV

BENCHMARKS = ["toy_quality", "guidance_latency", "guidance_quality", "steps_latency", "steps_quality", "style", "prune",
              "xl_quality", "xl_latency", "xl_prune", "xl_shapes",
              "distill_memory", "swap", "throughput", "http_overhead", "lora_overhead", "lora_kernel_gpu", "soak", "compile",
              "gpu_unet_step", "gpu_adapter_switch", "gpu_single_eval", "gpu_throughput", "gpu_vs_diffusers"]
GROUPS = {"gpu": ["gpu_unet_step", "gpu_adapter_switch", "gpu_single_eval", "gpu_throughput", "gpu_vs_diffusers",
                  "lora_kernel_gpu"]}
RESULTS_ENV = "DISTILLERY_BENCH_RESULTS"
DEFAULT_RESULTS = Path(".bench/results.json")


def skip_reason(name: str, device: str | None = None) -> str | None:
    """Why benchmark `name` cannot run on this machine (on `device`: the GPU suite's cpu smoke path), or None."""
    module = importlib.import_module(f"bench.{name}")
    if device == "cpu":
        return None if getattr(module, "CPU_SMOKE", False) else f"{name} has no CPU smoke path"
    if getattr(module, "NEEDS_CUDA", False) and not torch.cuda.is_available():
        return f"{name} needs a CUDA GPU and this machine has none"
    return None


def environment() -> dict:
    return {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "machine": platform.machine(), "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "malloc": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }


def expand(names: list[str]) -> list[str]:
    """Group names replaced by their members, in order, each benchmark once."""
    out = []
    for name in names:
        out += [n for n in GROUPS.get(name, [name]) if n not in out]
    return out


def print_table(name: str, figures: dict) -> None:
    print(f"\n{name}")
    width = max(len(k) for k in figures)
    for k, v in figures.items():
        print(f"  {k:<{width}}  {v:.4g}" if isinstance(v, float) else f"  {k:<{width}}  {v}")


@contextlib.contextmanager
def run_scope(parent: Path = Path(".bench")):
    """A fresh folder for one run of several benchmarks, named to their processes in $REFERENCES_ENV, where
    they keep what they share (bench/references.py); deleted at the end, so nothing outlives the run."""
    parent.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="references-", dir=parent)
    try:
        yield {**os.environ, REFERENCES_ENV: folder}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("names", nargs="*", help=f"any of {BENCHMARKS} or a group {sorted(GROUPS)}; default: all")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the benchmark runs, figures mean little")
    parser.add_argument("--device", choices=["cuda", "cpu"],
                        help="GPU suite only: cuda (the default), or cpu with --quick: its CPU smoke path (toy "
                             "model, fp32; recorded as <name>_cpu_smoke, not as GPU figures)")
    parser.add_argument("--results", type=Path, default=Path(os.environ.get(RESULTS_ENV) or DEFAULT_RESULTS),
                        help=f"JSON file the figures are merged into (default: ${RESULTS_ENV}, else {DEFAULT_RESULTS})")
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(BENCHMARKS) - set(GROUPS)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {BENCHMARKS} or a group {sorted(GROUPS)}")
    names = expand(args.names) or BENCHMARKS
    if args.device:
        not_gpu = [n for n in names if not getattr(importlib.import_module(f"bench.{n}"), "NEEDS_CUDA", False)]
        if not_gpu:
            parser.error(f"--device is for the GPU suite ({GROUPS['gpu']}); {not_gpu} take none")
        if args.device == "cpu" and not args.quick:
            parser.error("--device cpu is the GPU suite's smoke path: add --quick")
    smoke = args.device == "cpu"
    if len(names) > 1 and not smoke:  # one process each: torch state (thread pools, allocator) of one never skews another
        with run_scope() as env:  # the run's shared renders and FID reference (bench/references.py), then gone
            failed = [name for name in names
                      if subprocess.run([sys.executable, "-m", "bench", name, "--results", str(args.results)]
                                        + (["--quick"] if args.quick else [])
                                        + (["--device", args.device] if args.device else []),
                                        check=False, env=env).returncode]
        if failed:  # the others ran and recorded theirs (a GPU session is short: one failure must not cost the rest)
            sys.exit(f"benchmark(s) failed: {failed}")
        return
    results_file: Path = args.results
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name in names:
        reason = skip_reason(name, args.device)
        if reason:
            print(f"\n{name}: SKIPPED ({reason}); nothing recorded")
            continue
        t0 = time.perf_counter()
        kwargs = {"device": "cpu"} if smoke else {}  # cuda: the GPU modules' default
        figures = importlib.import_module(f"bench.{name}").run(quick=args.quick, **kwargs)
        figures["bench_seconds"] = round(time.perf_counter() - t0, 1)
        setup = figures.pop("setup", {})
        suffix = "_cpu_smoke" if smoke else "_quick" if args.quick else ""
        print_table(name + {"_cpu_smoke": " (CPU smoke: NOT GPU figures)", "_quick": " (quick)", "": ""}[suffix],
                    {**figures, **{f"setup.{k}": v for k, v in setup.items()}})
        results[name + suffix] = {**figures, "environment": {**environment(), **setup}}
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=1))
        print(f"\nresults merged into {results_file}")


if __name__ == "__main__":
    main()
