"""Benchmarks of clip-triton: encoders by runtime and batch, server preprocessing, Triton end to end.

`python -m benchmarks.run` (`make bench`, `make bench-quick`); `python -m benchmarks.coverage` is
the export coverage table (a separate script).
"""
