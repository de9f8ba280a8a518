"""Benchmarks: bench-kernel (fault_bench.c, kernel_bench.py) and bench-baseline (baseline.py and its modules)."""
