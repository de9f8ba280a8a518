"""The page server's choice of what travels as data and what as a zero hint."""

from __future__ import annotations

from pathlib import Path

from umemd.ramfile import PAGE_SIZE, RamFile
from umemd.source import ZERO_RUN_MIN, zero_split


def test_zero_stretches_inside_data_travel_as_hints(tmp_path: Path) -> None:
    layout = "D" + "0" * ZERO_RUN_MIN + "DD" + "0" * (ZERO_RUN_MIN - 1) + "D" + "0" * ZERO_RUN_MIN
    path = tmp_path / "ram"
    path.write_bytes(b"".join((b"\x01" if c == "D" else b"\x00") * PAGE_SIZE for c in layout))
    ram = RamFile(path)
    n = len(layout)
    short = 1 + ZERO_RUN_MIN + 2
    assert zero_split(ram, 0, n) == [(0, 1, True), (1, 1 + ZERO_RUN_MIN, False),
                                     (1 + ZERO_RUN_MIN, short + ZERO_RUN_MIN, True),  # the short stretch rides
                                     (short + ZERO_RUN_MIN, n, False)]
    assert zero_split(ram, 1, 1 + ZERO_RUN_MIN) == [(1, 1 + ZERO_RUN_MIN, False)]
    ram.close()
