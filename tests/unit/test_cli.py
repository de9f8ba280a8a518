"""The umemd command line on a host without the module."""

from __future__ import annotations

from pathlib import Path

import pytest

from umemd import cli


def test_help_explains_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for word in ("list", "stats", "destroy", "exit status", "insmod kernel/umem.ko"):
        assert word in out


def test_missing_module_has_its_own_exit_code(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert cli.main(["--control", str(tmp_path / "control"), "list"]) == cli.EXIT_NO_MODULE
    assert "the umem module is not loaded (insmod kernel/umem.ko)" in caplog.text
