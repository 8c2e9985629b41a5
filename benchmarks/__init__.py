"""The benchmark suite: ``python -m benchmarks.run [--quick] [--output-dir DIR]``."""
