"""Fixtures for tests and benchmarks: a served subprocess, SD-1.5-shaped random UNets, random adapters."""
