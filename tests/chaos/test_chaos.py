"""The chaos run (issue 11): migrations of the e2e guest, each with faults drawn from its seed
(tests/chaos/plan.py), each ending verified or refused as documented, never with a wrong page
or past its deadline (tests/chaos/runner.py)."""

from __future__ import annotations

from pathlib import Path

from tests.harness.chaos import ChaosNet
from tests.harness.driver import Driver
from tests.harness.machine import GuestImage, Settings

from . import plan as chaos_plan
from .runner import Record, run


def test_chaos(vm: Driver, net: ChaosNet, guest: GuestImage, settings: Settings, workdir: Path, seed: str,
               index: int, records: list[Record]) -> None:
    plan = chaos_plan.draw(f"{seed}/{index}")
    record = Record(index, plan.seed, plan.describe(), plan.expect.value)
    print(f"\nrun {index} (seed {plan.seed!r}), expecting {record.expect}:", *record.faults, sep="\n  ")
    vm.run(run(vm.topo, net, guest, settings, workdir, plan, record))
    records.append(record)
    print(*record.events, sep="\n")
    assert record.ok, (f"run {index} of CHAOS_SEED={seed}: {record.outcome} ({record.detail}), expected "
                       f"{record.expect}; replay with CHAOS_SEED={seed} CHAOS_ONLY={index}; logs in {workdir}")
