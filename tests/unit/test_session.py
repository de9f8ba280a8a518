"""The source's release gate (umemd.session) and the QMP statuses that move it
(umemd.qmpwatch): fail closed, every rule from the invariant."""

from __future__ import annotations

import pytest

from umemd.errors import LocalProtocolError
from umemd.qmpwatch import _MigrationStatus
from umemd.session import SOURCE_TRANSITIONS, SourceEvent, SourceGate, SourcePhase


def gate_after(*events: SourceEvent) -> SourceGate:
    gate = SourceGate()
    for event in events:
        gate.handle(event)
    return gate


def test_every_phase_has_a_rule_for_every_event() -> None:
    assert {(p, e) for p in SourcePhase for e in SourceEvent} == set(SOURCE_TRANSITIONS)


@pytest.mark.parametrize("event", [SourceEvent.STOPPED, SourceEvent.RESUMED])
def test_a_stop_or_resume_before_the_switch_over_releases_nothing(event: SourceEvent) -> None:
    gate = gate_after(SourceEvent.STOPPED, event)
    assert gate.phase is SourcePhase.HELD
    assert not gate.wait_released(timeout=0)


@pytest.mark.parametrize("event", [SourceEvent.QMP_LOST, SourceEvent.MIGRATION_CANCELLED,
                                   SourceEvent.MIGRATION_FAILED, SourceEvent.QEMU_QUIT])
def test_losing_sight_of_the_source_or_its_migration_before_the_release_aborts(event: SourceEvent) -> None:
    gate = gate_after(event)
    assert gate.aborted and not gate.wait_released(timeout=0)
    assert gate_after(event, SourceEvent.PRE_SWITCHOVER).aborted, "an abort is final"


@pytest.mark.parametrize("event", [SourceEvent.PRE_SWITCHOVER, SourceEvent.OPERATOR_STOPPED])
def test_pre_switchover_or_the_operators_word_releases(event: SourceEvent) -> None:
    assert gate_after(event).wait_released(timeout=0)


@pytest.mark.parametrize("event", [SourceEvent.RESUMED, SourceEvent.MIGRATION_CANCELLED,
                                   SourceEvent.MIGRATION_FAILED])
def test_the_source_guest_running_again_after_the_release_aborts(event: SourceEvent) -> None:
    assert gate_after(SourceEvent.PRE_SWITCHOVER, SourceEvent.COMPLETED, event).aborted


@pytest.mark.parametrize("event", [SourceEvent.COMPLETED, SourceEvent.QEMU_QUIT, SourceEvent.QMP_LOST])
def test_after_the_release_the_source_quitting_keeps_serving(event: SourceEvent) -> None:
    assert gate_after(SourceEvent.PRE_SWITCHOVER, event).released


def test_each_change_is_told_once_with_its_reason() -> None:
    told: list[tuple[SourcePhase, str]] = []
    gate = SourceGate(lambda phase, reason: told.append((phase, reason)))
    gate.handle(SourceEvent.STOPPED)
    gate.handle(SourceEvent.PRE_SWITCHOVER, "pre-switchover")
    gate.handle(SourceEvent.COMPLETED)
    gate.handle(SourceEvent.RESUMED, "RESUME")
    gate.handle(SourceEvent.RESUMED)
    assert [phase for phase, _ in told] == [SourcePhase.RELEASED, SourcePhase.ABORTED]
    assert told[1][1] == "the source guest runs again: RESUME"


def test_an_unknown_event_is_our_bug() -> None:
    with pytest.raises(LocalProtocolError):
        SourceGate().handle("STOP")  # type: ignore[arg-type]


# ---- what QEMU's migration statuses mean ----------------------------------------


def test_an_earlier_attempts_cancelled_status_is_not_this_migrations() -> None:
    gate = SourceGate()
    status = _MigrationStatus(gate)
    status.start("cancelled", running=True)
    status.update("cancelled")
    assert gate.phase is SourcePhase.HELD
    for s in ("setup", "active", "cancelled"):
        status.update(s)
    assert gate.aborted


def test_completed_at_start_releases_only_a_paused_guest() -> None:
    paused, running = SourceGate(), SourceGate()
    _MigrationStatus(paused).start("completed", running=False)
    _MigrationStatus(running).start("completed", running=True)
    assert paused.released and running.phase is SourcePhase.HELD


def test_pre_switchover_releases_when_polled_or_found() -> None:
    found, polled = SourceGate(), SourceGate()
    _MigrationStatus(found).start("pre-switchover", running=False)
    status = _MigrationStatus(polled)
    status.start("none", running=True)
    status.update("pre-switchover")
    assert found.released and polled.released
