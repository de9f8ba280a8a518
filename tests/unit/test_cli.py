"""The umemd command line on a host without the module."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.harness.command import umemd_command
from umemd import cli
from umemd.protocol import PAGE_SIZE


def test_help_explains_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for word in ("pull", "serve", "migrate", "keygen", "list", "stats", "destroy", "exit status",
                 "insmod kernel/umem.ko"):
        assert word in out


def test_missing_module_has_its_own_exit_code(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert cli.main(["--control", str(tmp_path / "control"), "list"]) == cli.EXIT_NO_MODULE
    assert "the umem module is not loaded (insmod kernel/umem.ko)" in caplog.text


@pytest.mark.parametrize("command", ["pull", "serve", "migrate", "keygen", "list", "stats", "destroy"])
def test_every_option_of_every_command_is_explained(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    options = [line.split()[0] for line in out.splitlines() if line.startswith("  -")]
    assert options, out
    for line in out.split("options:")[1].split("\n  -")[1:]:
        assert len(line.split()) > 2, f"an option of {command} has no help: {line!r}"


def test_migrate_without_a_pull_daemon_fails_and_names_it(caplog: pytest.LogCaptureFixture) -> None:
    status = cli.main(["migrate", "--src-qmp", "/nonexistent/src.qmp", "--dst-qmp", "127.0.0.1:9",
                       "--dst-status", "127.0.0.1:9", "--uri", "tcp:127.0.0.1:9", "--ready-timeout", "1"])
    assert status == cli.EXIT_FAILED
    assert "no umemd pull status at 127.0.0.1:9" in caplog.text


@pytest.mark.parametrize(("text", "expected"), [("root", (0, 0)), ("4242", (4242, 0)), ("4242:107", (4242, 107)),
                                                ("root:root", (0, 0))])
def test_owner_takes_names_or_numbers_and_defaults_the_group_to_root(text: str, expected: tuple[int, int]) -> None:
    assert cli.parse_owner(text) == expected


@pytest.mark.parametrize(("argv", "message"), [
    (["--owner", "no-such-user-here"], "no user 'no-such-user-here' on this host"),
    (["--owner", "root:no-such-group-here"], "no group 'no-such-group-here' on this host"),
    (["--owner", ":kvm"], "give a user"),
    (["--mode", "0"], "not a mode from 1 to 0777"),
    (["--mode", "4755"], "not a mode from 1 to 0777"),
    (["--mode", "rw"], "not a mode from 1 to 0777"),
])
def test_pull_refuses_a_bad_owner_or_mode_naming_it(argv: list[str], message: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["pull", "vm1", "--size", "1M", "--listen", "127.0.0.1:1", "--key-file", "k", *argv])
    assert info.value.code == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_serve_with_its_qmp_unreachable_serves_nothing_and_exits_1(tmp_path: Path) -> None:
    """Fail closed: a mistyped --qmp must not release the pages (it did: "it is gone, so its RAM
    file is final")."""
    ram = tmp_path / "ram"
    ram.write_bytes(b"\x01" * PAGE_SIZE * 4)
    key = tmp_path / "key"
    key.write_text("ab" * 32 + "\n")
    key.chmod(0o600)  # umemd refuses a key others can read
    with socket.socket() as listener:  # a destination that would take the pages
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        serve = subprocess.run(umemd_command("serve", str(ram), "--connect", f"127.0.0.1:{port}",
                                             "--key-file", str(key), "--migration-id", "00" * 16,
                                             "--qmp", str(tmp_path / "no-such.qmp")),
                               capture_output=True, text=True, timeout=120)
    assert serve.returncode == cli.EXIT_FAILED, serve.stderr
    assert "migration was aborted" in serve.stderr and "no-such.qmp" in serve.stderr, serve.stderr


def test_serve_needs_qmp_or_the_operators_word(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "ram", "--connect", "127.0.0.1:1", "--key-file", "k", "--migration-id", "00" * 16])
    assert info.value.code == cli.EXIT_USAGE
    assert "one of the arguments --qmp --guest-stopped-for-good is required" in capsys.readouterr().err


def key_file(tmp_path: Path, text: str = "ab" * 32 + "\n", mode: int = 0o600) -> Path:
    key = tmp_path / "key"
    key.write_text(text)
    key.chmod(mode)
    return key


SERVE = ["serve", "RAM", "--connect", "127.0.0.1:9", "--migration-id", "00" * 16, "--guest-stopped-for-good"]


@pytest.fixture(autouse=True)
def ram_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-page RAM file named RAM in the working directory, for the serve commands below."""
    (tmp_path / "RAM").write_bytes(bytes(PAGE_SIZE))
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("prepage", ["0", "-3"])
def test_prepage_below_one_is_refused_it_would_never_send_the_requested_page(
        prepage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([*SERVE, "--key-file", str(key_file(tmp_path)), "--prepage", prepage])
    assert info.value.code == cli.EXIT_USAGE
    assert "at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "mode", "message"), [
    ("ab" * 32 + "\n", 0o644, "readable or writable by group or others (mode 0644): chmod 600"),
    ("not hex at all, but long enough to pass for 32 bytes\n", 0o600, "does not hold a hex key"),
    ("ab" * 8 + "\n", 0o600, "is 8 bytes; at least 32 are needed"),
])
def test_a_key_file_others_can_read_or_not_made_by_keygen_is_refused(
        text: str, mode: int, message: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert cli.main([*SERVE, "--key-file", str(key_file(tmp_path, text, mode))]) == cli.EXIT_FAILED
    assert message in caplog.text


def test_keygen_never_overwrites_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = key_file(tmp_path)
    assert cli.main(["keygen", str(key)]) == cli.EXIT_FAILED
    assert "exists: keygen never overwrites a key" in caplog.text
    assert key.read_text() == "ab" * 32 + "\n"


@pytest.mark.parametrize(("extra", "message"), [
    (["--tls-cert", "c.pem", "--tls-key", "k.pem"], "--tls-ca CA.pem"),
    (["--tls-ca", "ca.pem"], "without --tls-cert"),
    (["--tls-cert", "c.pem"], "--tls-cert needs --tls-key"),
])
def test_tls_without_a_verified_peer_is_refused_naming_the_fix(extra: list[str], message: str, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    assert cli.main([*SERVE, "--key-file", str(key_file(tmp_path)), *extra]) == cli.EXIT_FAILED
    assert message in caplog.text


def test_a_listening_side_needs_the_peers_name_with_a_ca(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    argv = ["serve", "RAM", "--listen", "127.0.0.1:0", "--migration-id", "00" * 16, "--guest-stopped-for-good",
            "--key-file", str(key_file(tmp_path)), "--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-ca", "ca.pem"]
    assert cli.main(argv) == cli.EXIT_FAILED
    assert "needs --tls-name" in caplog.text
