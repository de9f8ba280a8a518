"""A migration cancelled at pre-switchover, after the page server released:
the source guest runs on, the page server aborts, the pull refuses the
instance; the retry, a new migration from the same running guest, is
verified page by page on the destination."""

from __future__ import annotations

from pathlib import Path

from tests.harness.driver import Driver
from tests.harness.machine import GuestImage, Settings
from tests.harness.umem import cancelled_then_retried
from umemd.status import PullState

from .test_migrate import recovered


def test_cancelled_at_pre_switchover_then_retried_as_a_new_migration(vm: Driver, guest: GuestImage,
                                                                     settings: Settings, workdir: Path) -> None:
    cancelled, retried = vm.run(cancelled_then_retried(vm.topo, guest, settings, workdir))
    assert cancelled.released_status["source_released"] is True
    assert PullState(cancelled.last_status["state"]) is PullState.ABORTED, cancelled.last_status
    assert cancelled.pull_rc == 1, "the pull must refuse an aborted migration's instance"
    assert cancelled.serve_rc == 1 and "migration aborted" in cancelled.serve_log, cancelled.serve_log
    assert cancelled.source_status == "running"
    recovered(retried)
    assert retried.report["migration_id"] != cancelled.last_status["migration_id"]
