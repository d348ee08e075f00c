"""Benchmarks of grenadine-sv against raw CRIU, cold starts, supervisord and the disk.

Not part of the default test run: `python -m tests.bench [--quick]` (or `contrib/bootstrap bench`
and `contrib/bootstrap bench-quick`) runs them; see __main__.py.
"""
