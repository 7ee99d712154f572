"""Run benchmarks, print a table each, merge figures into .bench/results.json."""

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

BENCHMARKS = ["toy_quality", "guidance_latency", "guidance_quality", "distill_memory", "swap", "throughput",
              "http_overhead", "lora_overhead", "lora_kernel_gpu"]
RESULTS = Path(".bench/results.json")


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


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("names", nargs="*", help=f"any of {BENCHMARKS}; default: all")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the benchmark runs, figures mean little")
    args = parser.parse_args()
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {BENCHMARKS}")
    names = args.names or BENCHMARKS
    if len(names) > 1:  # one process each: torch state (thread pools, allocator) of one never skews another
        for name in names:
            subprocess.run([sys.executable, "-m", "bench", name] + (["--quick"] if args.quick else []), check=True)
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in names:
        t0 = time.perf_counter()
        figures = importlib.import_module(f"bench.{name}").run(quick=args.quick)
        figures["bench_seconds"] = round(time.perf_counter() - t0, 1)
        print_table(name + (" (quick)" if args.quick else ""), figures)
        results[name + ("_quick" if args.quick else "")] = {**figures, "environment": environment()}
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1))
    print(f"\nresults merged into {RESULTS}")


if __name__ == "__main__":
    main()
