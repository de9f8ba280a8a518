"""Command lines: umemd's, the one way the harness, the tests and the benchmarks start it, and
any command in a network namespace."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.harness import CHECKOUT

VENV_PYTHON = CHECKOUT / ".venv" / "bin" / "python"  # the venv's python, the same path in the test VM


def umemd_command(*args: str, python: Path | str = sys.executable, verbose: bool = False,
                  netns: str | None = None) -> list[str]:
    """``PYTHON -m umemd.cli [-v] ARGS...``, run in the network namespace ``netns`` if given."""
    command = [str(python), "-m", "umemd.cli", *(["-v"] if verbose else []), *args]
    return in_netns(netns, command) if netns else command


def in_netns(netns: str, command: list[str]) -> list[str]:
    """``command`` run in the network namespace ``netns``."""
    return ["ip", "netns", "exec", netns, *command]
