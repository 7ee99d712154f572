"""Benchmarks: `python -m bench [NAME ...] [--quick]`; figures merge into .bench/results.json."""

# The folder of one run's shared renders and FID reference (bench/references.py): `python -m bench` with several
# benchmarks makes it and hands it to their processes in this variable. Here, not there: the runner stays light.
REFERENCES_ENV = "DISTILLERY_BENCH_REFERENCES"
