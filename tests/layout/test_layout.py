"""The layout checks pass on the checkout, and fail on a tree that breaks their rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import CHECKOUT

from . import definitions, imports


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checkout_keeps_the_import_rule() -> None:
    assert imports.check(CHECKOUT) == []


def test_the_checkout_has_one_definition_of_each_helper() -> None:
    assert definitions.check(CHECKOUT) == []


@pytest.mark.parametrize(("path", "text", "area", "module"), [
    ("daemon/umemd/source.py", "from tests.harness.net import free_port\n", "daemon", "tests.harness.net"),
    ("daemon/umemd/cli.py", "def f() -> None:\n    import bench.race\n", "daemon", "bench.race"),
    ("tests/harness/umem.py", "from bench.modes import Settings\n", "harness", "bench.modes"),
    ("tests/harness/umem.py", "from tests.e2e import conftest\n", "harness", "tests.e2e"),
    ("tests/chaos/conftest.py", "from tests.e2e.conftest import Driver\n", "tests/chaos", "tests.e2e.conftest"),
    ("tests/e2e/test_x.py", "from bench.umem_mode import UmemMode\n", "tests/e2e", "bench.umem_mode"),
    ("bench/race.py", "from tests.qemu.conftest import qemu\n", "bench", "tests.qemu.conftest"),
    ("tests/kernel/test_x.py", "from ..daemon import conftest\n", "tests/kernel", "tests.daemon"),
])
def test_a_forbidden_import_fails_the_check(tmp_path: Path, path: str, text: str, area: str, module: str) -> None:
    problems = imports.check(tree(tmp_path, {path: text}))
    assert len(problems) == 1 and problems[0].startswith(f"{path}:"), problems
    assert f" {area} imports {module}" in problems[0], problems


def test_what_the_rule_allows_passes(tmp_path: Path) -> None:
    assert imports.check(tree(tmp_path, {
        "daemon/umemd/cli.py": "import json\nfrom umemd.status import PullState\nfrom . import errors\n",
        "tests/harness/umem.py": "from umemd.cli import parse_size\nfrom tests.harness import CHECKOUT\n",
        "tests/daemon/test_x.py": "from tests.harness.net import free_port\nfrom .conftest import Migration\n",
        "bench/race.py": "from tests.harness.topology import VmTopology\nfrom .modes import Mode\nimport umemd\n",
    })) == []


def one_helper_tree(root: Path, second: str) -> Path:
    return tree(root, {"tests/harness/net.py": "def free_port() -> int:\n    return 0\n", "bench/x.py": second})


@pytest.mark.parametrize(("second", "what"), [
    ("def free_port() -> int:\n    return 1\n", "a free TCP port: 2 definitions"),
    ("def wait_for() -> None: ...\ndef wait_until() -> None: ...\n", "waiting for a condition: 2 definitions"),
    ("class Vm:\n    def wait_serial(self) -> None: ...\nclass RemoteVm(Vm):\n    def wait_serial(self) -> None: ...\n",
     "the serial-log wait of a VM: 2 definitions"),
    ("PAGE = 4096\nPAGE_SIZE = 4096\n", "the page size: 2 definitions"),
    ("def f(text: str) -> object:\n    return text.rpartition(':'), 'x'.rpartition(':')\n",
     "HOST:PORT parsing: 2 definitions"),
    ("A = ['-m', 'umemd.cli']\nB = ['-m', 'umemd.cli']\n", "the umemd command line: 2 definitions"),
])
def test_a_second_definition_fails_the_check(tmp_path: Path, second: str, what: str) -> None:
    problems = definitions.check(one_helper_tree(tmp_path, second))
    assert any(p.startswith(what) for p in problems), problems


def test_an_exception_outside_errors_py_fails_the_check(tmp_path: Path) -> None:
    problems = definitions.check(tree(tmp_path, {"daemon/umemd/errors.py": "class UmemError(Exception): ...\n",
                                                 "daemon/umemd/x.py": "class OddError(UmemError): ...\n"}))
    assert "daemon/umemd/x.py:1 OddError: an exception of the daemon outside daemon/umemd/errors.py" in problems
