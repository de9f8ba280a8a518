"""One definition of each shared helper, and each concept in its one home.

A helper is known by the names it has had: one definition across daemon/, tests/ and bench/
under any of them (a copy under its old name is a copy). Besides: HOST:PORT is split in one
place (``rpartition(":")``), the page size is assigned once and 4096 written nowhere else in
the daemon, the harness and the benchmarks, the umemd command line is spelled (``"umemd.cli"``)
once, and every exception class of the daemon lives in ``daemon/umemd/errors.py``. This
checker's own folder, which names them all, is not searched.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .sources import Source, sources


@dataclass(frozen=True)
class Helper:
    what: str
    names: tuple[str, ...]  # its name, then any it had before
    methods: bool = False   # count methods too (else module-level definitions only)


HELPERS = (
    Helper("waiting for a condition", ("wait_until", "wait_for")),
    Helper("a free TCP port", ("free_port",)),
    Helper("a sample percentile", ("percentile",)),
    Helper("a histogram-bucket percentile", ("bucket_percentile", "_bucket_percentile")),
    Helper("the doc-block writer", ("update_doc",)),
    Helper("the py-spy summariser", ("summarize_profile",)),
    Helper("the tty progress display", ("ProgressLine", "terminal_progress")),
    Helper("the umemd command line", ("umemd_command", "umemd_argv")),
    Helper("the serial-log wait of a VM", ("wait_serial",), methods=True),
)
PAGE_NAMES = frozenset({"PAGE_SIZE", "PAGE", "PAGESIZE"})
PAGE_LITERAL_AREAS = ("daemon/", "tests/harness/", "bench/")
UMEMD_MODULE = "umemd.cli"
ERRORS_MODULE = Path("daemon/umemd/errors.py")
CHECKER = ("tests", "layout")  # this folder names the helpers and literals it looks for


@dataclass(frozen=True)
class Site:
    path: Path
    line: int
    name: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} {self.name}"


def definitions(source: Source, methods: bool) -> Iterator[Site]:
    """Functions and classes of ``source``: module-level ones, and with ``methods`` those in classes."""
    nodes = ast.walk(source.tree) if methods else iter(source.tree.body)
    for node in nodes:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield Site(source.path, node.lineno, node.name)


def assigned_names(source: Source) -> Iterator[Site]:
    for node in ast.walk(source.tree):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name):
                yield Site(source.path, node.lineno, target.id)


def calls_splitting_host_port(source: Source) -> Iterator[Site]:
    for node in ast.walk(source.tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "rpartition"
                and [getattr(a, "value", None) for a in node.args] == [":"]):
            yield Site(source.path, node.lineno, 'rpartition(":")')


def constants(source: Source, value: object) -> Iterator[Site]:
    for node in ast.walk(source.tree):
        if isinstance(node, ast.Constant) and type(node.value) is type(value) and node.value == value:
            yield Site(source.path, node.lineno, repr(value))


def exception_classes(source: Source) -> Iterator[Site]:
    for node in ast.walk(source.tree):
        if isinstance(node, ast.ClassDef) and any(_names_an_error(base) for base in node.bases):
            yield Site(source.path, node.lineno, node.name)


def _names_an_error(base: ast.expr) -> bool:
    name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
    return name.endswith(("Error", "Exception"))


def exactly_one(what: str, sites: list[Site]) -> Iterator[str]:
    if len(sites) != 1:
        yield f"{what}: {len(sites)} definitions, not 1: " + ", ".join(map(str, sites))


def check(root: Path) -> list[str]:
    tree = [src for src in sources(root) if src.path.parts[:2] != CHECKER]
    problems: list[str] = []
    for helper in HELPERS:
        sites = [s for src in tree for s in definitions(src, helper.methods) if s.name in helper.names]
        problems += exactly_one(helper.what, sites)
    problems += exactly_one("HOST:PORT parsing", [s for src in tree for s in calls_splitting_host_port(src)])
    problems += exactly_one("the page size", [s for src in tree for s in assigned_names(src) if s.name in PAGE_NAMES])
    problems += exactly_one("the page size, written out",
                            [s for src in tree if str(src.path).startswith(PAGE_LITERAL_AREAS)
                             for s in constants(src, 4096)])
    problems += exactly_one("the umemd command line", [s for src in tree for s in constants(src, UMEMD_MODULE)])
    problems += [f"{s}: an exception of the daemon outside {ERRORS_MODULE}" for src in tree
                 if src.path.parts[0] == "daemon" and src.path != ERRORS_MODULE for s in exception_classes(src)]
    return problems
