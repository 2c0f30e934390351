"""Benchmarks: `python -m bench.<name>`; numbers go to stdout as JSON, never into tests."""
