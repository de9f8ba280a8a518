"""The demand path's claim on the CPU.

A faulting vCPU waits for the demand thread of ``umemd pull`` and for the
demand thread of ``umemd serve``; the push threads only move bulk data. Two
things would make a woken demand thread wait anyway: the GIL, which another
Python thread may keep for the default switch interval (5 ms), and the
scheduler, which may let a busy thread finish its slice first. Both daemons
shorten the first (:func:`short_gil_slices`) and raise their demand threads'
priority (:func:`favour_this_thread`; it needs CAP_SYS_NICE, and without it
the thread runs at the process's priority).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

GIL_SWITCH_INTERVAL = 0.0005  # seconds (Python's default: 0.005)
DEMAND_NICE = -10


def short_gil_slices() -> None:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)


def favour_this_thread() -> None:
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DEMAND_NICE)
