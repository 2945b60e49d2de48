"""Benchmarks (`make bench`); not collected by pytest. See run.py."""
