"""Run benchmarks, print a table each, merge figures into a results file (default .bench/results.json).

The results file: `--results PATH`, else $DISTILLERY_BENCH_RESULTS, else .bench/results.json.
A benchmark module with NEEDS_CUDA = True is skipped (nothing recorded) where there is no CUDA.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCHMARKS = ["toy_quality", "guidance_latency", "guidance_quality", "steps_latency", "steps_quality", "style", "prune",
              "distill_memory", "swap", "throughput", "http_overhead", "lora_overhead", "lora_kernel_gpu", "soak"]
RESULTS_ENV = "DISTILLERY_BENCH_RESULTS"
DEFAULT_RESULTS = Path(".bench/results.json")


def skip_reason(name: str) -> str | None:
    """Why benchmark `name` cannot run on this machine, or None when it can."""
    module = importlib.import_module(f"bench.{name}")
    if getattr(module, "NEEDS_CUDA", False) and not torch.cuda.is_available():
        return f"{name} needs a CUDA GPU and this machine has none"
    return None


def environment() -> dict:
    return {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "machine": platform.machine(), "cuda": torch.cuda.is_available(),
        "malloc": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }


def print_table(name: str, figures: dict) -> None:
    print(f"\n{name}")
    width = max(len(k) for k in figures)
    for k, v in figures.items():
        print(f"  {k:<{width}}  {v:.4g}" if isinstance(v, float) else f"  {k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("names", nargs="*", help=f"any of {BENCHMARKS}; default: all")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the benchmark runs, figures mean little")
    parser.add_argument("--results", type=Path, default=Path(os.environ.get(RESULTS_ENV) or DEFAULT_RESULTS),
                        help=f"JSON file the figures are merged into (default: ${RESULTS_ENV}, else {DEFAULT_RESULTS})")
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {BENCHMARKS}")
    names = args.names or BENCHMARKS
    if len(names) > 1:  # one process each: torch state (thread pools, allocator) of one never skews another
        for name in names:
            subprocess.run([sys.executable, "-m", "bench", name, "--results", str(args.results)]
                           + (["--quick"] if args.quick else []), check=True)
        return
    results_file: Path = args.results
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name in names:
        reason = skip_reason(name)
        if reason:
            print(f"\n{name}: SKIPPED ({reason}); nothing recorded")
            continue
        t0 = time.perf_counter()
        figures = importlib.import_module(f"bench.{name}").run(quick=args.quick)
        figures["bench_seconds"] = round(time.perf_counter() - t0, 1)
        print_table(name + (" (quick)" if args.quick else ""), figures)
        results[name + ("_quick" if args.quick else "")] = {**figures, "environment": environment()}
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=1))
        print(f"\nresults merged into {results_file}")


if __name__ == "__main__":
    main()
