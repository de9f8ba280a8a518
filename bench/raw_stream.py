"""The link's own limits, beside umemd's push (bench/daemon_bench.py) and the race's modes
(bench/link.py): ``python -m bench.raw_stream recv HOST PORT SIZE [--ack]`` and ``... send HOST PORT
FILE MODE``, a raw TCP stream; ``... ping HOST PORT ROUNDS SIZE``, the requester's end of request/response
round trips of SIZE-byte responses (a page) (:func:`answer_pings` is the other). Each end its own process or
thread; standard library only, so that a receiver in the test VM starts as fast as it can."""

from __future__ import annotations

import argparse
import json
import mmap
import socket
import sys
import time

MIB = 1 << 20
REQUEST = 8         # bytes of a round trip's request (about a fault record's)
ACK = b"A"          # the receiver's one byte after the whole stream (--ack)


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
            if args.ack:
                conn.sendall(ACK)
    return 0


def read_exactly(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes, or fewer only at the end of the stream."""
    chunks, left = [], size
    while left:
        data = sock.recv(left)
        if not data:
            break
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks)


def ping(args: argparse.Namespace) -> int:
    """Accept one connection, then ``rounds`` times: send a request, read ``size`` bytes. Prints
    ``listening``, then every round trip's time in ns as a JSON list (the percentiles are the
    caller's: bench.metrics is not standard library)."""
    with socket.create_server((args.host, args.port)) as listener:
        print("listening", flush=True)
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            request = bytes(REQUEST)
            times: list[int] = []
            for _ in range(args.rounds):
                t0 = time.perf_counter_ns()
                conn.sendall(request)
                if len(read_exactly(conn, args.size)) != args.size:
                    raise SystemExit(f"the answering end closed after {len(times)} round trips")
                times.append(time.perf_counter_ns() - t0)
    print(json.dumps(times), flush=True)
    return 0


def answer_pings(sock: socket.socket, size: int) -> int:
    """The answering end of :func:`ping`: ``size`` bytes for every request, until the stream
    ends; returns the number answered."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    page = b"\x5a" * size
    answered = 0
    while len(read_exactly(sock, REQUEST)) == REQUEST:
        sock.sendall(page)
        answered += 1
    return answered


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
    r.add_argument("--ack", action="store_true", help="send one byte back once the whole stream is in")
    s = sub.add_parser("send")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("file")
    s.add_argument("mode", choices=("sendfile", "sendall"))
    pg = sub.add_parser("ping")
    pg.add_argument("host")
    pg.add_argument("port", type=int)
    pg.add_argument("rounds", type=int)
    pg.add_argument("size", type=int, help="bytes of each response")
    args = parser.parse_args(argv)
    return {"recv": receive, "send": send, "ping": ping}[args.command](args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
