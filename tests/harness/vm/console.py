"""Scan the test VM's kernel console for signs of a kernel problem.

Only the kernel console (ttyS0) is scanned: the command's own output travels
on ttyS1, so a test that logs "WARNING:" (Python's logging does) cannot fail
the run.  The kernel boots with ``loglevel=5``, which still prints every
KERN_WARNING and worse, i.e. all of the reports below.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# Substrings of the first line of every kernel report we treat as a failure:
# WARN*() ("WARNING: CPU: 0 PID: 1 at ..."), BUG()/BUG: reports (including
# "BUG: KASAN: ...", "BUG: sleeping function called from invalid context",
# soft lockups), oopses, stack dumps, panics, GPFs and sanitizer reports.
PATTERNS = (
    "WARNING:",
    "BUG:",
    "Oops",
    "Call Trace",
    "Kernel panic",
    "general protection fault",
    "UBSAN",
    "KASAN",
)

_PATTERN_RE = re.compile("|".join(re.escape(p) for p in PATTERNS))


@dataclass(frozen=True)
class Problem:
    lineno: int  # 1-based line number in the console log
    pattern: str
    line: str

    def __str__(self) -> str:
        return f"console line {self.lineno}: {self.pattern!r}: {self.line}"


class ConsoleScanner:
    """Feed console bytes as they arrive; collect the lines that match.

    Lines are split on "\\n"; the "\\r" the serial console adds is dropped.
    An unterminated last line is checked by :meth:`finish`.
    """

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.count = 0
        self._partial = b""

    def feed(self, data: bytes) -> list[str]:
        """Add console output; return the complete lines it finished."""
        *complete, self._partial = (self._partial + data).split(b"\n")
        return [self._add(raw) for raw in complete]

    def finish(self) -> list[str]:
        """Flush a trailing line that has no newline."""
        if not self._partial:
            return []
        raw, self._partial = self._partial, b""
        return [self._add(raw)]

    def _add(self, raw: bytes) -> str:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        self.count += 1
        match = _PATTERN_RE.search(line)
        if match:
            self.problems.append(Problem(self.count, match.group(0), line))
        return line


def scan(lines: Iterable[str]) -> list[Problem]:
    """The problems in a whole console log given as lines."""
    scanner = ConsoleScanner()
    for line in lines:
        scanner.feed(line.encode() + b"\n")
    return scanner.problems


def excerpt(lines: list[str], problems: list[Problem], before: int = 5,
            limit: int = 80) -> list[str]:
    """The part of a console log worth showing after a failure.

    From a few lines before the first problem (the start of the splat), at
    most ``limit`` lines; without problems, the last ``limit`` lines.
    """
    if problems:
        start = max(0, problems[0].lineno - 1 - before)
        return lines[start:start + limit]
    return lines[-limit:]
