"""Benchmarks: `python -m bench [NAME ...] [--quick]`; figures merge into .bench/results.json."""
