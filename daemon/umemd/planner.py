"""What the page server sends next: a pure object, no I/O (host-tested).

Each page is *unsent* or *sent* (sent on demand or pushed in this push
session, or present at the destination, as its HAVE said). Two sources of
runs:

- a demand for page P sends P (even if sent: it has not arrived) and then
  pre-pages the unsent pages after it, up to ``prepage`` pages in all,
  stopping at the first one sent; it opens a *hot window* of
  ``after_fault`` pages after them;
- the push takes runs of at most ``run`` unsent pages: from the hot
  windows first, newest fault last (a window is followed until it is
  done), then in order from a cursor.

Thread model: the demand and push threads of the page server share one
planner; every method takes ``_lock``.
"""

from __future__ import annotations

import collections
import threading

PREPAGE = 8  # pages sent with each demand request, requested page first
PUSH_AFTER_FAULT = 256  # pages after a fault the push stream sends next
PUSH_RUN = 256  # pages per push run (1 MiB)
HOT_WINDOWS = 64  # most recent faults followed at once


class PushPlanner:
    """Which pages to send: demand runs, then push runs, each page pushed once."""

    def __init__(self, pages: int, *, prepage: int = PREPAGE, after_fault: int = PUSH_AFTER_FAULT,
                 run: int = PUSH_RUN) -> None:
        self.pages = pages
        if prepage < 1:  # the demanded page itself is the first of them
            raise ValueError(f"prepage {prepage}: at least 1, or the demanded page is never sent")
        self.prepage = prepage
        self.after_fault = after_fault
        self.run = run
        self._sent = bytearray(pages)  # 1 = sent or present
        self._hot: collections.deque[tuple[int, int]] = collections.deque(maxlen=HOT_WINDOWS)  # (next, limit)
        self._cursor = 0
        self._lock = threading.Lock()

    def cover(self, present: bytes) -> None:
        """A new push session: ``present`` (one byte per page, 1 = the destination has it)
        is all that is sent; the cursor starts over."""
        if len(present) != self.pages:
            raise ValueError(f"a cover of {len(present)} pages for {self.pages}")
        with self._lock:
            self._sent = bytearray(present)
            self._cursor = 0

    def unsent(self) -> int:
        with self._lock:
            return self._sent.count(0)

    def demand(self, page: int) -> tuple[int, int]:
        """The run [page, end) to send for a demand of ``page``; marks it sent."""
        if not 0 <= page < self.pages:
            raise ValueError(f"page {page} is outside 0..{self.pages - 1}")
        with self._lock:
            limit = min(page + self.prepage, self.pages)
            end = self._sent.find(1, page + 1, limit)
            end = limit if end < 0 else end
            self._sent[page:end] = b"\x01" * (end - page)
            self._hot.append((end, min(end + self.after_fault, self.pages)))
            return page, end

    def next_push(self) -> tuple[int, int] | None:
        """The next push run [start, end) of unsent pages, marked sent; None once every page is."""
        with self._lock:
            while self._hot:
                position, limit = self._hot.popleft()
                start = self._sent.find(0, position, limit)
                if start >= 0:
                    end = self._take(start, limit)
                    if end < limit:
                        self._hot.appendleft((end, limit))  # keep following this fault
                    return start, end
            start = self._sent.find(0, self._cursor)
            if start < 0:
                return None
            self._cursor = self._take(start, self.pages)
            return start, self._cursor

    def _take(self, start: int, limit: int) -> int:
        """Mark the unsent run from ``start`` (at most ``run`` pages, not past ``limit``) sent."""
        run_end = min(start + self.run, limit)
        end = self._sent.find(1, start, run_end)
        end = run_end if end < 0 else end
        self._sent[start:end] = b"\x01" * (end - start)
        return end
