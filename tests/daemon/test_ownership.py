"""umemd pull gives the node to the QEMU that will map it, charges the
guest's pages to the cgroup it names, and its counters can be read while it
runs."""

from __future__ import annotations

import grp
import json
import os
import stat
import subprocess

from tests.harness.cgroups import memory_cgroups
from tests.harness.command import umemd_command
from tests.harness.waiting import wait_until
from umemd import node_path, read_counters
from umemd.protocol import PAGE_SIZE

from .conftest import Migration


def test_pull_owner_mode_cgroup_and_stats_beside_it(migration: Migration) -> None:
    kvm = grp.getgrnam("kvm").gr_gid
    with memory_cgroups() as make:
        guest = make("pulled-guest")
        pull = migration.pull("--owner", f"4242:{kvm}", "--mode", "0640", "--cgroup", str(guest.path))
        subprocess.run(["udevadm", "settle"], check=False)
        st = os.stat(node_path(migration.name))
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4242, kvm, 0o640)

        stats = subprocess.run(umemd_command("stats", migration.name),
                               capture_output=True, text=True)
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["present"] == 0

        migration.serve("--max-push-rate", "16")
        wait_until(lambda: read_counters(migration.name).filled > 1000, 60, "the first pages filled")
        filled = read_counters(migration.name).filled
        assert guest.shmem_bytes() >= filled * PAGE_SIZE * 3 // 4, "the pages pushed are not charged to --cgroup"
        pull.kill()
        migration.cleanup()
