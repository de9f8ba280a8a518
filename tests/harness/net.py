"""Network helpers: a free TCP port, and a veth pair into a network namespace for tests and
benchmarks that need a real link (pyroute2; inside the test VM only: it needs the veth module)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from pyroute2 import IPRoute, NetNS, netns


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LinkPair:
    netns: str
    ifname: str   # our end
    peer: str     # the namespace's end
    index: int    # our end's interface index

    def set_state(self, state: str) -> None:
        with IPRoute() as ipr:
            ipr.link("set", index=self.index, state=state)


@contextlib.contextmanager
def veth_namespace(name: str, ifname: str, peer: str, here: str, there: str) -> Iterator[LinkPair]:
    """Namespace ``name`` holding ``peer`` (address ``there``), reached over ``ifname``
    (address ``here``, /24) from this one; both removed on exit."""
    subprocess.run(["modprobe", "veth"], check=True)
    netns.create(name)
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=ifname, kind="veth", peer={"ifname": peer, "net_ns_fd": name})
            index = ipr.link_lookup(ifname=ifname)[0]
            ipr.addr("add", index=index, address=here, prefixlen=24)
            ipr.link("set", index=index, state="up")
        with NetNS(name) as ns:
            for dev, address in (("lo", None), (peer, there)):
                i = ns.link_lookup(ifname=dev)[0]
                if address:
                    ns.addr("add", index=i, address=address, prefixlen=24)
                ns.link("set", index=i, state="up")
        yield LinkPair(name, ifname, peer, index)
    finally:
        with IPRoute() as ipr:
            if ipr.link_lookup(ifname=ifname):
                ipr.link("del", ifname=ifname)
        netns.remove(name)
