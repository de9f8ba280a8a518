"""What a chaos run does, drawn from its seed: the faults, their moments, the outcome the
design promises (docs/reliability.md has the failure model behind it).

A plan is either

- *recoverable*: one to three distinct faults from :data:`RECOVERABLE`, each at its own
  random moment (a delay after the source's ``migrate``, a share of the pages present, or
  an event: the release, the destination's RESUME), injected one after the other; the run
  must end with a verified guest on the destination; or
- *terminal*: one fault from :data:`TERMINAL` at its phase (``migrate`` or
  ``migrate-continue`` held at the source's QMP monitor), after zero to two network faults
  injected while it is held; the run must end with the refusal the docs promise (the source
  guest runs on, serve exits 1 "migration aborted", the pull exits 1 ``aborted``), except
  when the operator's answer to a killed ``umemd migrate`` is to continue by hand: then a
  verified guest.

Every number comes from ``random.Random(f"{seed}/{index}")``: the same seed and index give
the same plan (the moments are the same; the interleaving with the daemons' own timing is
not, and neither is, say, how many pages a netem spell cost).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field


class Kind(enum.Enum):
    SERVE_KILLED = "serve SIGKILLed, restarted"
    PULL_KILLED = "pull SIGKILLed, restarted"
    LINK_DOWN = "page link down"
    NETEM = "netem loss, delay, reordering"
    QMP_DROPPED_AFTER_RELEASE = "serve's QMP monitor dropped after the release"
    MIGRATE_KILLED_AFTER_RESUME = "umemd migrate SIGKILLed after the destination's RESUME"
    CANCEL_AT_PRE_SWITCHOVER = "migrate_cancel at pre-switchover (after the release)"
    MIGRATE_KILLED_AT_PRE_SWITCHOVER = "umemd migrate SIGKILLed at pre-switchover"
    QMP_DROPPED_BEFORE_RELEASE = "serve's QMP monitor dropped before the release"


RECOVERABLE = (Kind.SERVE_KILLED, Kind.PULL_KILLED, Kind.LINK_DOWN, Kind.NETEM, Kind.QMP_DROPPED_AFTER_RELEASE,
               Kind.MIGRATE_KILLED_AFTER_RESUME)
NETWORK = (Kind.LINK_DOWN, Kind.NETEM)
TERMINAL = (Kind.CANCEL_AT_PRE_SWITCHOVER, Kind.MIGRATE_KILLED_AT_PRE_SWITCHOVER, Kind.QMP_DROPPED_BEFORE_RELEASE)
ON_EVENT = {Kind.QMP_DROPPED_AFTER_RELEASE: "the release", Kind.MIGRATE_KILLED_AFTER_RESUME: "RESUME"}
HELD_AT = {Kind.CANCEL_AT_PRE_SWITCHOVER: "migrate-continue", Kind.MIGRATE_KILLED_AT_PRE_SWITCHOVER: "migrate-continue",
           Kind.QMP_DROPPED_BEFORE_RELEASE: "migrate"}  # the command held at the source's monitor
TERMINAL_SHARE = 0.35  # of the plans
LINK_DOWN_S = (1.0, 30.0)


class Outcome(enum.Enum):
    VERIFIED = "verified"
    REFUSED = "refused as documented"
    WRONG_PAGE = "WRONG PAGE"
    HANG = "HANG"
    UNEXPECTED = "unexpected error"


@dataclass
class Fault:
    kind: Kind
    delay: float | None = None    # seconds after the previous step (the first: the source's ``migrate``
    #                               or the hold), or after the event of ON_EVENT
    present: float | None = None  # or: once this share of the pages is present
    params: dict[str, float | str] = field(default_factory=dict)

    def moment(self) -> str:
        if self.present is not None:
            return f"at {self.present:.0%} present"
        if self.kind in HELD_AT:
            return f"{self.delay:.1f} s into the held {HELD_AT[self.kind]}"
        return f"{self.delay:.1f} s after {ON_EVENT.get(self.kind, 'the previous step')}"

    def describe(self) -> str:
        params = ", ".join(f"{k} {v}" for k, v in self.params.items())
        return f"{self.kind.name.lower().replace('_', '-')} ({params + '; ' if params else ''}{self.moment()})"

    @property
    def netem_spec(self) -> str:
        p = self.params
        return f"delay {p['delay_ms']}ms {p['jitter_ms']}ms loss {p['loss_pct']}% reorder {p['reorder_pct']}%"


@dataclass
class Plan:
    seed: str
    faults: list[Fault]            # one after the other (in a terminal plan: while it is held)
    terminal: Fault | None = None

    @property
    def expect(self) -> Outcome:
        if self.terminal is None or self.terminal.params.get("operator") == "continue":
            return Outcome.VERIFIED
        return Outcome.REFUSED

    @property
    def push_capped(self) -> bool:
        """A refusal needs pages still missing when it comes: the push is capped (as in
        tests/e2e/test_abort.py) and no fault waits for pages."""
        return self.expect is Outcome.REFUSED

    def describe(self) -> list[str]:
        return [f.describe() for f in self.faults] + ([self.terminal.describe()] if self.terminal else [])


def draw(seed: str) -> Plan:
    rng = random.Random(seed)
    if rng.random() < TERMINAL_SHARE:
        terminal = _terminal(rng, rng.choice(TERMINAL))
        return Plan(seed, [_fault(rng, k, delay_only=True) for k in rng.sample(NETWORK, rng.randint(0, 2))],
                    terminal)
    faults = [_fault(rng, k) for k in rng.sample(RECOVERABLE, rng.randint(1, 3))]
    return Plan(seed, sorted(faults, key=_order))


def _order(fault: Fault) -> tuple[int, float]:
    """Events first (the release, then RESUME come early), then delays, then shares present."""
    if fault.kind in ON_EVENT:
        return 0, float(fault.kind is Kind.MIGRATE_KILLED_AFTER_RESUME)
    if fault.present is None:
        return 1, fault.delay or 0.0
    return 2, fault.present


def _fault(rng: random.Random, kind: Kind, delay_only: bool = False) -> Fault:
    fault = Fault(kind, params=_params(rng, kind))
    if kind in ON_EVENT:
        fault.delay = round(rng.uniform(0, 3), 1)
    elif delay_only or rng.random() < 0.5:
        fault.delay = round(rng.uniform(0, 15), 1)
    else:
        fault.present = round(rng.uniform(0.05, 0.7), 2)
    return fault


def _params(rng: random.Random, kind: Kind) -> dict[str, float | str]:
    if kind in (Kind.SERVE_KILLED, Kind.PULL_KILLED):
        return {"down_s": round(rng.uniform(0, 5), 1)}
    if kind is Kind.LINK_DOWN:
        return {"down_s": round(rng.uniform(*LINK_DOWN_S), 1)}
    if kind is Kind.NETEM:
        delay = rng.randint(1, 40)
        return {"delay_ms": delay, "jitter_ms": rng.randint(0, delay), "loss_pct": round(rng.uniform(0, 10), 1),
                "reorder_pct": rng.randint(0, 25), "for_s": round(rng.uniform(5, 30), 1)}
    return {}


def _terminal(rng: random.Random, kind: Kind) -> Fault:
    params: dict[str, float | str] = {}
    if kind is Kind.MIGRATE_KILLED_AT_PRE_SWITCHOVER:
        params["operator"] = rng.choice(("cancel", "continue"))
    return Fault(kind, delay=round(rng.uniform(0, 5), 1), params=params)
