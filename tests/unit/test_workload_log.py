"""The guest workload's serial report as the harness reads it while QEMU still writes it."""

from __future__ import annotations

from pathlib import Path

from tests.harness.machine import Vm


def test_a_line_still_being_written_is_not_parsed(tmp_path: Path) -> None:
    """Every Vm reads a serial log that QEMU appends to: its last line may be half written
    (``UMEMWL HB seq=42`` without its ``t=``), and must wait for its newline (tests/qemu's
    pre-copy test once failed with ``KeyError: 't'``)."""
    vm = Vm(tmp_path, "guest", [])
    vm.serial_path.write_text("UMEMWL HB seq=41 t=5000\nUMEMWL HB seq=42")
    assert vm.workload().heartbeats == [(41, 5000)]
    with vm.serial_path.open("a") as f:
        f.write(" t=6000\n")
    assert vm.workload().heartbeats == [(41, 5000), (42, 6000)]
