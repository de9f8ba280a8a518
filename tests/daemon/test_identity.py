"""Nothing but the migration's own daemons touch its instance: a page server
of another migration (same key, same RAM size) is refused while the right
one completes the guest, and a restarted pull never attaches to an instance
left by another migration."""

from __future__ import annotations

import secrets
from pathlib import Path

from tests.harness.waiting import wait_until
from umemd import Control, node_path
from umemd.protocol import PAGE_SIZE

from .conftest import MIB, SOURCE_SIZE, Migration, Umemd
from .test_pull import finish


def other_guests_ram(path: Path) -> Path:
    """The RAM file of another guest of the same size: every byte differs from the source's."""
    with open(path, "wb") as f:
        for _ in range(SOURCE_SIZE // MIB):
            f.write(b"\xbb" * MIB)
    return path


def test_a_serve_of_another_migration_is_refused_while_the_right_one_completes(
    migration: Migration, tmp_path: Path
) -> None:
    migration.pull()
    stale = migration.serve(source=other_guests_ram(tmp_path / "other-guest-ram"), migration_id=secrets.token_hex(16))
    stale.wait(timeout=600)
    assert migration.present() == 0, "a page server of another migration filled the instance"
    assert stale.proc.returncode != 0, "a refused page server exited 0"
    assert migration.migration_id in stale.text() and "belongs to migration" in stale.text(), stale.text()
    stale.killed = True  # ended, as it should: not one of the daemons finish() expects to exit 0
    guest = migration.guest("random", threads=2, touches=50)
    migration.serve()
    assert finish(migration, guest)["present"] == SOURCE_SIZE // PAGE_SIZE


def test_a_pull_never_attaches_to_an_instance_of_another_migration(migration: Migration) -> None:
    leftover = secrets.token_bytes(16)
    with Control() as control:
        control.create(migration.name, SOURCE_SIZE, tag=leftover).close()  # a pull of that migration died
    pull = Umemd(migration.log_path("pull"), "pull", migration.name, "--size", str(SOURCE_SIZE),
                 "--listen", f"127.0.0.1:{migration.port}", "--key-file", str(migration.key),
                 "--migration-id", migration.migration_id)
    migration.daemons.append(pull)
    wait_until(lambda: pull.proc.poll() is not None, 60, "the pull to refuse the leftover instance")
    assert pull.proc.returncode == 1, pull.text()
    assert f"belongs to migration {leftover.hex()}, not to {migration.migration_id}" in pull.text(), pull.text()
    assert node_path(migration.name).exists(), "the leftover instance is the operator's to remove"
