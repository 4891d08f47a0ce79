"""Benchmarks behind `distlocal bench ...`: measurements for BENCHMARKS.md, never run as timed tests."""
