"""Fixtures of the benchmarks' own tests (bench/test_bench.py, run by ``make test-qemu``)."""

from __future__ import annotations

from tests.harness.driver import guest

__all__ = ["guest"]
