"""The raw TCP stream that ``make bench-daemon`` sets beside umemd's push (bench/daemon_bench.py):
``python -m bench.raw_stream recv HOST PORT SIZE`` and ``... send HOST PORT FILE MODE``, each its
own process. Standard library only, so that a sender starts as fast as it can."""

from __future__ import annotations

import argparse
import mmap
import socket
import sys
import time

MIB = 1 << 20


def receive(args: argparse.Namespace) -> int:
    """Accept one connection and read ``size`` bytes into a reused buffer."""
    with socket.create_server((args.host, args.port)) as listener:
        print("listening", flush=True)
        conn, _ = listener.accept()
        with conn:
            buf = bytearray(MIB)
            view = memoryview(buf)
            left = args.size
            while left:
                n = conn.recv_into(view, min(left, MIB))
                if not n:
                    raise SystemExit(f"raw stream ended with {left} bytes to go")
                if left == args.size:
                    print(time.monotonic(), flush=True)
                left -= n
    return 0


def send(args: argparse.Namespace) -> int:
    """Connect and send the file: os.sendfile, or sendall of 1 MiB slices of its mapping."""
    with open(args.file, "rb") as f, socket.create_connection((args.host, args.port)) as sock:
        if args.mode == "sendfile":
            sock.sendfile(f)
        else:
            with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                view = memoryview(m)
                for start in range(0, len(m), MIB):
                    sock.sendall(view[start:start + MIB])
                view.release()
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.raw_stream", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("recv")
    r.add_argument("host")
    r.add_argument("port", type=int)
    r.add_argument("size", type=int)
    s = sub.add_parser("send")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("file")
    s.add_argument("mode", choices=("sendfile", "sendall"))
    args = parser.parse_args(argv)
    return receive(args) if args.command == "recv" else send(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
