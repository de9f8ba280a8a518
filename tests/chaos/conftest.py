"""Fixtures of the chaos lane (``make test-chaos``): the e2e topology (tests/harness/driver.py),
the test VM booted once, with the shaped page link of tests/harness/chaos.py; one test per run.

``CHAOS_SEED`` (default: a new one, printed) and ``CHAOS_RUNS`` (default 20) choose the runs;
run ``i`` of seed ``S`` is drawn from ``random.Random(f"{S}/{i}")``, so ``CHAOS_SEED=S`` replays
them all and ``CHAOS_SEED=S CHAOS_ONLY=i,j`` replays some. Every run's logs stay in
build/chaos/run-NN/; the results in build/chaos/results.json and results.md.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import CHECKOUT
from tests.harness.chaos import ChaosNet
from tests.harness.driver import Driver, guest, settings, vm_driver

from .report import markdown_table
from .runner import Record

LOGS = CHECKOUT / "build" / "chaos"
SEED = os.environ.get("CHAOS_SEED") or str(secrets.randbelow(10**9))
RUNS = int(os.environ.get("CHAOS_RUNS", "20"))
ONLY = [int(i) for i in os.environ.get("CHAOS_ONLY", "").split(",") if i]
RECORDS: list[Record] = []

__all__ = ["guest", "settings"]


def pytest_sessionstart(session: pytest.Session) -> None:
    print(f"chaos: CHAOS_SEED={SEED}, {len(ONLY) or RUNS} runs (replay: CHAOS_SEED={SEED} make test-chaos)",
          flush=True)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "index" in metafunc.fixturenames:
        indices = ONLY or list(range(RUNS))
        metafunc.parametrize("index", indices, ids=[f"run-{i:02d}" for i in indices])


@pytest.fixture(scope="session")
def seed() -> str:
    return SEED


@pytest.fixture(scope="session")
def vm() -> Iterator[Driver]:
    shutil.rmtree(LOGS, ignore_errors=True)
    yield from vm_driver(LOGS / "vm")


@pytest.fixture(scope="session")
def net(vm: Driver) -> Iterator[ChaosNet]:
    chaos_net = ChaosNet(vm.topo)
    vm.run(chaos_net.setup())
    try:
        yield chaos_net
    finally:
        vm.run(chaos_net.teardown())


@pytest.fixture
def workdir(index: int) -> Path:
    path = LOGS / f"run-{index:02d}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


@pytest.fixture
def records() -> list[Record]:
    return RECORDS


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not RECORDS:
        return
    LOGS.mkdir(parents=True, exist_ok=True)
    doc = {"seed": SEED, "runs": [r.__dict__ for r in RECORDS]}
    (LOGS / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (LOGS / "results.md").write_text(markdown_table(SEED, RECORDS))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if RECORDS:
        terminalreporter.write_line(markdown_table(SEED, RECORDS))
        terminalreporter.write_line(f"replay: CHAOS_SEED={SEED} make test-chaos (one run: CHAOS_ONLY=N)")
