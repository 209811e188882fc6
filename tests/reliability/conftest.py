"""Reliability suites (issue 7): fuzzing, hostile uploads, crash safety, concurrency, load, shutdown.

Each file keeps its own fixtures; long versions are marked ``slow`` (``pytest -m slow``).
"""
