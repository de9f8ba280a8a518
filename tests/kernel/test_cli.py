"""umemd list / stats / destroy against the real device."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

from tests.harness.command import umemd_command
from umemd import Server, node_path


def umemd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(umemd_command(*args), capture_output=True, text=True)


def test_list_stats_destroy(make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=2 << 20)
    server.zero(0, 4096)
    listed = json.loads(umemd("list", "--json").stdout)
    assert {"name": server.name, "size": 2 << 20, "present": 1, "served": True, "tag": "00" * 16} in listed

    stats = json.loads(umemd("stats", server.name).stdout)
    assert (stats["pages"], stats["present"], stats["zeroed"]) == (512, 1, 1)
    server.close()

    assert umemd("destroy", server.name).returncode == 0
    assert not node_path(server.name).exists()
    missing = umemd("destroy", server.name)
    assert missing.returncode == 1 and f"cannot destroy umem instance {server.name!r}" in missing.stderr
    gone = umemd("stats", server.name)
    assert gone.returncode == 1 and f"no umem instance {server.name!r}" in gone.stderr
