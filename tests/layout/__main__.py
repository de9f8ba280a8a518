"""python -m tests.layout: the import rule and one definition of each helper, over the checkout."""

from __future__ import annotations

import sys

from tests.harness import CHECKOUT

from . import definitions, imports

RULES = "docs/architecture.md#the-layout-and-the-import-rule"


def main() -> int:
    problems = imports.check(CHECKOUT) + definitions.check(CHECKOUT)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"layout: {len(problems)} problems (the rules: {RULES})", file=sys.stderr)
        return 1
    print("layout: the import rule holds and each helper has one definition")
    return 0


if __name__ == "__main__":
    sys.exit(main())
