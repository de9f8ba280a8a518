"""umemd serve and pull migrate a 256 MiB RAM file into a umem instance while
synthetic guests touch it; every byte ends equal to the source."""

from __future__ import annotations

import hashlib
import subprocess
import time

import pytest

from tests.harness.waiting import wait_until
from umemd import node_path
from umemd.protocol import PAGE_SIZE

from .conftest import HOLE, SOURCE_SIZE, ZEROS, Migration

PAGES = SOURCE_SIZE // PAGE_SIZE


def source_digest(migration: Migration) -> str:
    return hashlib.sha256(migration.source.read_bytes()).hexdigest()


def finish(migration: Migration, guest: subprocess.Popen[str]) -> dict[str, object]:
    """Wait for the guest and every daemon not killed; check the guest saw the source's bytes."""
    out, _ = guest.communicate(timeout=600)
    assert guest.returncode == 0, out
    assert out.split()[-1] == source_digest(migration), "the mapped memory differs from the source"
    for d in migration.daemons:
        if not d.killed:
            assert d.wait() == 0, d.text()
    assert not node_path(migration.name).exists(), "pull left its instance's node behind"
    return migration.pull_report()


@pytest.mark.parametrize("pattern", ["sequential", "random", "strided"])
def test_guest_faults_are_served_while_the_rest_is_pushed(migration: Migration, pattern: str) -> None:
    migration.pull()
    guest = migration.guest(pattern, threads=4, touches=150)
    migration.serve("--max-push-rate", "64")
    report = finish(migration, guest)
    assert report["present"] == PAGES
    assert report["faults"] > 0 and report["demand_pages"] > 0 and report["pushed_pages"] > 0
    hinted = (HOLE[1] - HOLE[0] + ZEROS[1] - ZEROS[0]) // PAGE_SIZE
    assert report["zero_pages"] >= hinted * 0.9  # a few may go on demand as data
    assert report["fault_latency_us"]["p50"] > 0  # type: ignore[index]


def started_but_unfinished(migration: Migration) -> None:
    wait_until(lambda: migration.present() > 1000, 60, "the first pages")
    present = migration.present()
    assert 0 < present < PAGES, f"{present} of {PAGES} pages present: the fault must hit a migration in flight"


def test_page_server_killed_and_restarted(migration: Migration) -> None:
    pull = migration.pull()
    guest = migration.guest("random", threads=2, touches=100)
    first = migration.serve("--max-push-rate", "16")
    started_but_unfinished(migration)
    first.kill()
    migration.serve()
    report = finish(migration, guest)
    assert report["reconnects"] >= 1
    assert pull.proc.returncode == 0


def test_pull_killed_and_restarted_attaches_and_finishes(migration: Migration) -> None:
    first = migration.pull()
    guest = migration.guest("random", threads=2, touches=100)
    serve = migration.serve("--max-push-rate", "16")
    started_but_unfinished(migration)
    first.kill()
    assert node_path(migration.name).exists(), "the instance must outlive its daemon"
    migration.pull()
    report = finish(migration, guest)
    assert report["attached"] is True
    assert serve.proc.returncode == 0


def test_capped_push_ends_when_faults_fetched_everything(migration: Migration) -> None:
    """The guest's final checksum read faults every page in on demand while
    the push crawls at 0.01 MiB/s: after its first 1 MiB frame the push
    waits 100 s. Serve must hear COMPLETE in that wait and exit right after
    the pull, not when the wait ends."""
    pull = migration.pull()
    guest = migration.guest("sequential", threads=1, touches=10)
    serve = migration.serve("--max-push-rate", "0.01", "--prepage", "64")
    out, _ = guest.communicate(timeout=600)
    assert guest.returncode == 0, out
    assert out.split()[-1] == source_digest(migration), "the mapped memory differs from the source"
    assert pull.wait() == 0, pull.text()
    pulled = time.monotonic()
    assert serve.wait(timeout=60) == 0, serve.text()
    assert time.monotonic() - pulled < 10, "serve outlived the finished pull"
    report = migration.pull_report()
    assert report["present"] == PAGES
    assert int(str(report["pushed_pages"])) < PAGES // 10, "the push, not the faults, fetched the pages"
    assert "push stream stopped" in serve.text()
