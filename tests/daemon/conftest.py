"""Fixtures of the daemon suite: umemd serve and pull as real processes on a
real umem device, inside the test VM (`make test-daemon`)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import CHECKOUT
from tests.harness.command import umemd_command
from tests.harness.kmod import IN_VM, load_module
from tests.harness.net import free_port
from tests.harness.waiting import wait_until
from umemd import Control, InstanceNotFoundError, node_path
from umemd.device import CONTROL_PATH
from umemd.protocol import PAGE_SIZE

LOGS = CHECKOUT / "build" / "daemon-logs"
MIB = 1 << 20
SOURCE_SIZE = 256 * MIB
HOLE = (64 * MIB, 80 * MIB)  # never written: SEEK_HOLE finds it
ZEROS = (80 * MIB, 96 * MIB)  # written with zeros: found by comparison


@pytest.fixture(scope="session", autouse=True)
def umem_module() -> None:
    if not IN_VM and not CONTROL_PATH.exists():
        pytest.skip("umem.ko is not loaded here: the daemon suite runs inside the test VM (make test-daemon)")
    load_module()


@pytest.fixture(scope="session")
def source_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256 MiB whose every page differs, with a hole and a zero-filled range."""
    path = tmp_path_factory.mktemp("source") / "guest-ram"
    with open(path, "wb") as f:
        for start in range(0, SOURCE_SIZE, MIB):
            if HOLE[0] <= start < HOLE[1]:
                continue
            f.seek(start)
            if ZEROS[0] <= start < ZEROS[1]:
                f.write(bytes(MIB))
            else:
                f.write(b"".join(f"{page:08x}".encode() * (PAGE_SIZE // 8) for page in range(start // PAGE_SIZE,
                                                                                       (start + MIB) // PAGE_SIZE)))
        f.truncate(SOURCE_SIZE)
    return path


@pytest.fixture(scope="session")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("key") / "key"
    path.write_text(os.urandom(32).hex() + "\n")
    path.chmod(0o600)  # umemd refuses a key others can read
    return path


class Umemd:
    """One umemd process, its log in a file (appended to: the logs of earlier runs stay before it)."""

    def __init__(self, log: Path, *args: str, netns: str | None = None) -> None:
        self.log = log
        command = umemd_command(*args, verbose=True, netns=netns)
        self._out = open(log, "ab")  # noqa: SIM115 (closed in wait/kill)
        self._start = self._out.tell()  # where this process's output begins
        self.proc = subprocess.Popen(command, stdout=self._out, stderr=subprocess.STDOUT)
        self.killed = False

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def expect_exit(self, code: int, timeout: float = 60) -> None:
        """It must end on its own with ``code`` (finish() then leaves it alone)."""
        assert self.wait(timeout) == code, f"expected exit {code}:\n{self.text()[-3000:]}"
        self.killed = True

    def kill(self) -> None:
        self.killed = True
        self.proc.send_signal(signal.SIGKILL)
        self.wait(10)

    def text(self) -> str:
        """This process's output only."""
        with self.log.open("rb") as f:
            f.seek(self._start)
            return f.read().decode(errors="replace")


class Migration:
    """A pull, a serve and synthetic guests around one instance."""

    def __init__(self, tmp_path: Path, source: Path, key: Path, name: str) -> None:
        self.tmp = tmp_path
        self.source = source
        self.key = key
        self.name = name
        self.port = free_port()
        self.migration_id = secrets.token_hex(16)  # this migration's daemons, restarts included
        self.report = tmp_path / "pull.json"
        self.daemons: list[Umemd] = []

    def pull(self, *extra: str, listen: str | None = None) -> Umemd:
        where = ["--listen", listen or f"127.0.0.1:{self.port}"]
        d = Umemd(self.log_path("pull"), "pull", self.name, "--size", str(self.source.stat().st_size), *where,
                  "--key-file", str(self.key), "--migration-id", self.migration_id, "--report", str(self.report),
                  *extra)
        self.daemons.append(d)
        # The node comes before the listener: a peer connecting in between would be refused.
        wait_until(lambda: "listening on" in d.text() or d.proc.poll() is not None, 60, "the pull to listen")
        assert d.proc.poll() is None and node_path(self.name).exists(), d.text()
        return d

    def serve(self, *extra: str, connect: str | None = None, netns: str | None = None,
              key: Path | None = None, migration_id: str | None = None, source: Path | None = None) -> Umemd:
        d = Umemd(self.log_path("serve"), "serve", str(source or self.source), "--connect",
                  connect or f"127.0.0.1:{self.port}", "--key-file", str(key or self.key),
                  "--migration-id", migration_id or self.migration_id, "--guest-stopped-for-good", *extra,
                  netns=netns)
        self.daemons.append(d)
        return d

    def log_path(self, kind: str) -> Path:
        """Logs go to build/daemon-logs/<test>/ in the checkout, kept after the VM is gone."""
        directory = LOGS / self.name
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f"{kind}-{sum(d.log.name.startswith(kind) for d in self.daemons) + 1}.log"

    def guest(self, pattern: str, threads: int = 4, touches: int = 200) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "tests.daemon.guest", str(node_path(self.name)),
                                 str(self.source), pattern, str(threads), str(touches)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def present(self) -> int:
        with Control() as control:
            return next((i.present for i in control.list() if i.name == self.name), -1)

    def pull_report(self) -> dict[str, object]:
        result: dict[str, object] = json.loads(self.report.read_text())
        return result

    def cleanup(self) -> None:
        for d in self.daemons:
            if d.proc.poll() is None:
                d.kill()
        try:
            with Control() as control:
                control.destroy(self.name)
        except InstanceNotFoundError:
            pass


def instance_name(test: str) -> str:
    """A valid, unique instance name for a test (parametrized ones included)."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in test)
    return f"d{os.getpid()}-{cleaned[-48:]}"


@pytest.fixture
def migration(tmp_path: Path, source_file: Path, key_file: Path, request: pytest.FixtureRequest) -> Iterator[Migration]:
    m = Migration(tmp_path, source_file, key_file, instance_name(request.node.name))
    yield m
    m.cleanup()
    for d in m.daemons:
        if d.log.exists():
            sys.stdout.write(f"--- {d.log.name}\n{d.text()[:3000]}\n...\n{d.text()[-3000:]}\n")
