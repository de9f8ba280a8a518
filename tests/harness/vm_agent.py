"""The benchmark's agent on the destination side: a small JSON-lines server.

Run inside the test VM (``python3 -m tests.harness.vm --hostfwd H:4440 -- python3
tests/harness/vm_agent.py --port 4440``) or, for the host topology, as a
local process. The benchmark on the host connects once, and the agent serves
that one connection: it starts and stops the destination QEMU of each run (and,
later, any other destination-side process such as a umem daemon), answers
clock probes, and hands back files (QEMU's trace log and stderr). When the
connection closes the agent kills what it started and exits, so the test VM
powers off (a connection that closes before its first request does not count:
the agent accepts the next).

Standard library only: the interpreter starts under TCG, imports are slow.

Protocol: the agent first sends ``{"agent": "umem-bench", "pid": N, "workdir": DIR}`` (a real
greeting, since slirp accepts a connection even when nothing listens in the
guest); then one JSON object per line in each direction, a request
``{"op": ..., ...}`` and its reply ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``. Operations:

- ``time``: ``{"t": ns}``, this side's ``CLOCK_REALTIME`` (QMP event timestamps
  use the same clock), for the host's offset estimate;
- ``spawn`` name, argv, [env], [cwd]: start a process, stdout and stderr to
  ``<workdir>/<name>.out``; ``{"pid": N, "out": path}``;
- ``poll`` name: ``{"returncode": null | N}``;
- ``stop`` name, [grace]: SIGTERM, then SIGKILL after ``grace`` seconds;
  ``{"returncode": N}``;
- ``signal`` name, signum: send a signal (e.g. 9, to kill a daemon mid-run);
  ``{}``;
- ``run`` argv, [limit]: run to completion (killed after ``limit`` seconds);
  ``{"returncode", "output"}``;
- ``read`` path, [offset], [max]: ``{"data": base64, "size": N}``;
- ``exit``: stop everything and exit.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GREETING = "umem-bench"
READ_MAX = 64 << 20


class Agent:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.running = True

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        method = getattr(self, f"op_{op}", None)
        if method is None:
            raise ValueError(f"unknown op {op!r}")
        result: dict[str, Any] = method(req)
        return {"ok": True, **result}

    def op_time(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"t": time.time_ns()}

    def op_spawn(self, req: dict[str, Any]) -> dict[str, Any]:
        name = str(req["name"])
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"bad name {name!r}")
        old = self.procs.get(name)
        if old is not None and old.poll() is None:
            raise ValueError(f"{name} is still running")
        out = self.workdir / f"{name}.out"
        env = {**os.environ, **{str(k): str(v) for k, v in req.get("env", {}).items()}}
        with out.open("wb") as f:
            proc = subprocess.Popen([str(a) for a in req["argv"]], stdin=subprocess.DEVNULL,
                                    stdout=f, stderr=subprocess.STDOUT, env=env,
                                    cwd=req.get("cwd"), start_new_session=True)
        self.procs[name] = proc
        return {"pid": proc.pid, "out": str(out)}

    def _proc(self, req: dict[str, Any]) -> subprocess.Popen[bytes]:
        name = str(req["name"])
        if name not in self.procs:
            raise ValueError(f"no process {name!r}")
        return self.procs[name]

    def op_poll(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"returncode": self._proc(req).poll()}

    def op_stop(self, req: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc(req)
        return {"returncode": stop(proc, float(req.get("grace", 10)))}

    def op_signal(self, req: dict[str, Any]) -> dict[str, Any]:
        self._proc(req).send_signal(int(req["signum"]))
        return {}

    def op_run(self, req: dict[str, Any]) -> dict[str, Any]:
        p = subprocess.run([str(a) for a in req["argv"]], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=float(req.get("limit", 60)), check=False)
        return {"returncode": p.returncode, "output": p.stdout.decode(errors="replace")}

    def op_read(self, req: dict[str, Any]) -> dict[str, Any]:
        path = Path(req["path"])
        size = path.stat().st_size
        with path.open("rb") as f:
            f.seek(int(req.get("offset", 0)))
            data = f.read(min(int(req.get("max", READ_MAX)), READ_MAX))
        return {"data": base64.b64encode(data).decode(), "size": size}

    def op_exit(self, req: dict[str, Any]) -> dict[str, Any]:
        self.running = False
        return {}

    def stop_all(self) -> None:
        for proc in self.procs.values():
            stop(proc, 5)


def stop(proc: subprocess.Popen[bytes], timeout: float) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def serve(sock: socket.socket, agent: Agent) -> None:
    """Serve the host's connection. One that closes before its first request does not count (the
    host gives up on a connect attempt that slirp accepted before anything listened here, and the
    attempt may reach us late): accept the next."""
    while agent.running:
        conn, _ = sock.accept()
        if serve_connection(conn, agent):
            return


def serve_connection(conn: socket.socket, agent: Agent) -> bool:
    """Answer requests until the connection closes; whether it made any."""
    served = False
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn, conn.makefile("rwb") as f:
        try:
            f.write(json.dumps({"agent": GREETING, "pid": os.getpid(),
                                "workdir": str(agent.workdir)}).encode() + b"\n")
            f.flush()
            while agent.running:
                line = f.readline()
                if not line:
                    break
                served = True
                try:
                    reply = agent.handle(json.loads(line))
                except Exception as e:  # report, keep serving
                    reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()
        except OSError:
            pass  # the host went away: it is gone for good if it had asked anything
    return served


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=4440, help="port to listen on (default 4440)")
    parser.add_argument("--workdir", type=Path, help="where process output goes (default: a new temp dir)")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="exit if no connection arrives within this many seconds")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="umem-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    agent = Agent(workdir)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(1)
        sock.settimeout(args.timeout)
        print(f"umem-bench agent: listening on {args.host}:{args.port}, workdir {workdir}", flush=True)
        try:
            serve(sock, agent)
        finally:
            agent.stop_all()
    print("umem-bench agent: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
