"""The Python sources the layout checks read: every ``.py`` file under daemon/, tests/ and bench/."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TOP_LEVELS = ("daemon", "tests", "bench")


@dataclass(frozen=True)
class Source:
    path: Path  # relative to the checkout
    tree: ast.Module


def sources(root: Path) -> Iterator[Source]:
    for top in TOP_LEVELS:
        for path in sorted((root / top).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield Source(path.relative_to(root), ast.parse(path.read_text(), str(path)))
