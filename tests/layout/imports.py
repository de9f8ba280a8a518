"""The import rule (docs/architecture.md): who may import whom.

An area is a folder that imports as one: the daemon (``daemon/umemd``, the ``umemd`` package),
the harness (``tests/harness``), the benchmarks (``bench``) and each test suite
(``tests/<suite>``, this checker included). The daemon imports nothing of ours but itself; the
harness the daemon and itself; the benchmarks the daemon, the harness and themselves; a suite
the daemon, the harness and its own folder. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from .sources import Source, sources

DAEMON, HARNESS, BENCH = "daemon", "harness", "bench"
ALLOWED = {DAEMON: {DAEMON}, HARNESS: {DAEMON, HARNESS}, BENCH: {DAEMON, HARNESS, BENCH}}
SUITE_MAY_IMPORT = {DAEMON, HARNESS}


def area_of_file(path: Path) -> str:
    """The area a source file belongs to: daemon, harness, bench, or the suite's folder."""
    parts = path.parts
    if parts[0] == "daemon":
        return DAEMON
    if parts[0] == "bench":
        return BENCH
    if len(parts) > 2 and parts[1] == "harness":
        return HARNESS
    return f"tests/{parts[1]}" if len(parts) > 2 else "tests"


def area_of_module(module: str) -> str | None:
    """The area a module belongs to; None for one that is not ours (stdlib, third party)."""
    parts = module.split(".")
    if parts[0] == "umemd":
        return DAEMON
    if parts[0] == "bench":
        return BENCH
    if parts[0] == "tests" and len(parts) > 1:  # ``tests`` alone is only the namespace
        return HARNESS if parts[1] == "harness" else f"tests/{parts[1]}"
    return None


def allowed(importer: str, imported: str) -> bool:
    if importer in ALLOWED:
        return imported in ALLOWED[importer]
    return imported == importer or imported in SUITE_MAY_IMPORT


def package_of(path: Path) -> list[str]:
    """The dotted package a file's relative imports start from (``daemon/`` is not a package)."""
    parts = list(path.with_suffix("").parts)
    if parts[0] == "daemon":
        parts = parts[1:]
    return parts if path.name == "__init__.py" else parts[:-1]


def imported_modules(source: Source) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in ``source``, relative ones resolved; ``from P import N``
    yields ``P.N`` too, since N may be a module."""
    for node in ast.walk(source.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            package = package_of(source.path)
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def violations(source: Source) -> Iterator[str]:
    importer = area_of_file(source.path)
    seen: set[tuple[int, str]] = set()
    for line, module in imported_modules(source):
        imported = area_of_module(module)
        if imported is None or allowed(importer, imported) or (line, imported) in seen:
            continue
        seen.add((line, imported))
        yield f"{source.path}:{line}: {importer} imports {module} ({imported} is not {importer}'s to import)"


def check(root: Path) -> list[str]:
    return [v for source in sources(root) for v in violations(source)]
