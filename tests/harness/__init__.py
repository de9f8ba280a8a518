"""The harness: everything that boots and drives machines, for the tests, the benchmarks and the demo.

- :mod:`.vm`: the test VM (``python -m tests.harness.vm``), Debian's kernel under QEMU;
- :mod:`.machine`: the patched QEMU on this host, the test guest, :class:`~.machine.Vm`;
- :mod:`.topology`: the end-to-end topology (the source on the host, the destination in the
  test VM) and its agent, :mod:`.vm_agent`; :mod:`.chaos` and :mod:`.tcp_relay` shape it;
- :mod:`.umem`: umem in that topology (``UmemSide``, ``migrate_guest``); :mod:`.driver`: a
  pytest session driving it; :mod:`.demo`: ``make demo``;
- :mod:`.command`: the umemd command line; :mod:`.kmod`: umem.ko; :mod:`.mapping`, :mod:`.cgroups`,
  :mod:`.net`, :mod:`.waiting`: mappings of instance nodes, memory cgroups, veth namespaces and
  free ports, waiting without fixed sleeps.

The import rule (docs/architecture.md, checked by ``python -m tests.layout``): the harness imports
the daemon (``umemd``) and itself, never a test suite or a benchmark.
"""

from __future__ import annotations

from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
