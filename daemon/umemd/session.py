"""The source's side of a migration session: when its pages may be read, sans-I/O.

The invariant every rule here follows from:

    No page reaches a destination guest unless it was read from the RAM
    file after the release, and the source guest cannot have written it
    since.

The *release* is the moment the source guest is stopped for the
switch-over, for good: QEMU's migration reaches ``pre-switchover`` (umemd
migrate turns ``pause-before-switchover`` on), by which point
``migration_stop_vm()`` has stopped every vCPU and drained the block layer
(``vm_stop()`` runs ``bdrv_drain_all()``), so no vCPU or in-flight DMA writes
guest RAM any more, and the source stays paused until ``migrate-continue``.
A STOP alone is not a release (``stop``, ``werror=stop`` and snapshots stop a
guest that will run again), and neither is a lost QMP connection.

Theory of operation. :class:`SourceGate` holds the phase and takes
:class:`SourceEvent`\\ s from the QMP watcher (umemd.qmpwatch); every change
of phase is in :data:`SOURCE_TRANSITIONS`, (phase, event) -> next phase.
An event the table does not list for a phase is a bug and raises
:class:`LocalProtocolError`. Phases::

    HELD ──pre-switchover / completed / operator says stopped──> RELEASED
     │ │                                                             │
     │ └─ resumed, stopped: stays HELD (nothing was read)            │
     │                                                               │
     └─ migration failed or cancelled, QMP lost, QEMU quit ──> ABORTED <── resumed, failed, cancelled
                                                                 (the source guest runs again)

RELEASED stays RELEASED on completed, on the source QEMU quitting and on a
lost QMP connection after the release (the QEMU that could write the file is
gone or stopped; the destination guest may already run on these pages).
ABORTED is final: the serve exits non-zero and tells the destination, which
refuses to finish the instance; a retry is a new migration with a new id.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable

from umemd.errors import LocalProtocolError


class SourcePhase(enum.Enum):
    HELD = "held"  # the source guest may still run: nothing is read from the RAM file
    RELEASED = "released"  # stopped for the switch-over for good: pages may be read and sent
    ABORTED = "aborted"  # the migration is off: serve nothing more, tell the destination


class SourceEvent(enum.Enum):
    PRE_SWITCHOVER = "the source QEMU's migration reached pre-switchover"
    COMPLETED = "the source QEMU's migration completed (its guest stays paused)"
    OPERATOR_STOPPED = "the operator says the source guest is stopped for good (--guest-stopped-for-good)"
    STOPPED = "the source guest stopped"
    RESUMED = "the source guest runs again"
    MIGRATION_FAILED = "the source QEMU's migration failed"
    MIGRATION_CANCELLED = "the source QEMU's migration was cancelled"
    QEMU_QUIT = "the source QEMU quit"
    QMP_LOST = "the source QEMU's QMP connection was lost"


_HELD_ABORTS = (SourceEvent.MIGRATION_FAILED, SourceEvent.MIGRATION_CANCELLED, SourceEvent.QEMU_QUIT,
                SourceEvent.QMP_LOST)
_RELEASED_ABORTS = (SourceEvent.RESUMED, SourceEvent.MIGRATION_FAILED, SourceEvent.MIGRATION_CANCELLED)
_RELEASED_STAYS = (SourceEvent.PRE_SWITCHOVER, SourceEvent.COMPLETED, SourceEvent.OPERATOR_STOPPED,
                   SourceEvent.STOPPED, SourceEvent.QEMU_QUIT, SourceEvent.QMP_LOST)

SOURCE_TRANSITIONS: dict[tuple[SourcePhase, SourceEvent], SourcePhase] = {
    (SourcePhase.HELD, SourceEvent.PRE_SWITCHOVER): SourcePhase.RELEASED,
    (SourcePhase.HELD, SourceEvent.COMPLETED): SourcePhase.RELEASED,  # a restarted serve, after the switch-over
    (SourcePhase.HELD, SourceEvent.OPERATOR_STOPPED): SourcePhase.RELEASED,
    (SourcePhase.HELD, SourceEvent.STOPPED): SourcePhase.HELD,
    (SourcePhase.HELD, SourceEvent.RESUMED): SourcePhase.HELD,
    **{(SourcePhase.HELD, e): SourcePhase.ABORTED for e in _HELD_ABORTS},
    **{(SourcePhase.RELEASED, e): SourcePhase.ABORTED for e in _RELEASED_ABORTS},
    **{(SourcePhase.RELEASED, e): SourcePhase.RELEASED for e in _RELEASED_STAYS},
    **{(SourcePhase.ABORTED, e): SourcePhase.ABORTED for e in SourceEvent},
}


class SourceGate:
    """The source's phase, shared by the QMP watcher (which feeds events) and
    the channel threads (which wait for the release and check for an abort).

    Thread model: :meth:`handle` runs on the QMP watcher's thread; the other
    methods on any thread. The phase and reason change under ``_lock``;
    ``on_change`` is called outside it, once per change of phase.
    """

    def __init__(self, on_change: Callable[[SourcePhase, str], None] | None = None) -> None:
        self.phase = SourcePhase.HELD
        self.reason = "waiting for the source guest to stop for the switch-over"
        self.history: list[SourceEvent] = []  # every event handled, in order
        self._lock = threading.Lock()
        self._decided = threading.Event()  # released or aborted
        self._on_change = on_change

    def handle(self, event: SourceEvent, detail: str = "") -> SourcePhase:
        """Move by ``event``; returns the new phase."""
        with self._lock:
            old = self.phase
            new = SOURCE_TRANSITIONS.get((old, event))
            self.history.append(event)
            if new is None:
                raise LocalProtocolError(f"no transition from {old.value} on {event!r}")
            if new is not old:
                self.phase = new
                self.reason = f"{event.value}{': ' + detail if detail else ''}"
        if new is not old:
            self._decided.set()
            if self._on_change:
                self._on_change(new, self.reason)
        return new

    def wait_released(self, timeout: float | None = None) -> bool:
        """Block until the release (True) or an abort (False; also on timeout)."""
        self._decided.wait(timeout)
        return self.phase is SourcePhase.RELEASED

    @property
    def released(self) -> bool:
        return self.phase is SourcePhase.RELEASED

    @property
    def aborted(self) -> bool:
        return self.phase is SourcePhase.ABORTED
