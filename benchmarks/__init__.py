"""The benchmark suite of issue 4: ``python -m benchmarks`` (see README.md)."""
