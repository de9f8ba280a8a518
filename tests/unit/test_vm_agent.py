"""The destination-side agent (tests/harness/vm_agent.py) outlives a connect attempt the host gave up on."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.harness.topology import AGENT


def connect(port: int) -> socket.socket:
    deadline = time.monotonic() + 60
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=30)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_connection_closed_before_any_request_does_not_end_the_agent(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent = subprocess.Popen([sys.executable, str(AGENT), "--host", "127.0.0.1", "--port", str(port), "--workdir",
                              str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        connect(port).close()  # the host's attempt that timed out
        with connect(port) as conn, conn.makefile("rwb") as f:
            assert json.loads(f.readline())["agent"] == "umem-bench"
            f.write(b'{"op": "time"}\n')
            f.flush()
            assert json.loads(f.readline())["ok"] is True
            f.write(b'{"op": "exit"}\n')
            f.flush()
            f.readline()
        assert agent.wait(30) == 0
    finally:
        agent.kill()
        agent.wait()
