"""Benchmarks: scripts run as ``python -m benchmarks.<name>``; not timed tests."""
