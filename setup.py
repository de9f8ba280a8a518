"""umemd: post-copy live migration for QEMU/KVM through the umem device.

`pip install .` builds the cffi binding of kernel/include/uapi/linux/umem.h;
`python setup.py build_kmod [--kdir DIR] [--strict]` builds kernel/umem.ko.
"""

from __future__ import annotations

import glob
import re
import subprocess
import sys
from typing import ClassVar

from setuptools import Command, setup


def newest_kernel_build_tree() -> str:
    def version_key(path: str) -> list[int]:
        return [int(x) for x in re.findall(r"\d+", path)]

    trees = sorted(glob.glob("/lib/modules/*/build"), key=version_key)
    if not trees:
        sys.exit("no kernel build tree in /lib/modules/*/build: install linux-headers-amd64 (make apt)")
    return trees[-1]


class BuildKmod(Command):
    """Build kernel/umem.ko out of tree."""

    description = "build kernel/umem.ko against installed kernel headers"
    user_options: ClassVar[list[tuple[str, str | None, str]]] = [
        ("kdir=", None, "kernel build tree (default: newest /lib/modules/*/build)"),
        ("strict", None, "build with W=1 and fail on any compiler warning"),
    ]
    boolean_options: ClassVar[list[str]] = ["strict"]

    def initialize_options(self) -> None:
        self.kdir: str | None = None
        self.strict = False

    def finalize_options(self) -> None:
        self.kdir = self.kdir or newest_kernel_build_tree()

    def run(self) -> None:
        cmd = ["make", "-C", "kernel", f"KDIR={self.kdir}"]
        if self.strict:
            cmd.append("W=1")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        if proc.returncode:
            sys.exit(f"building kernel/umem.ko against {self.kdir} failed")
        if self.strict and "warning:" in proc.stdout + proc.stderr:
            sys.exit("kernel/umem.ko built with warnings (W=1): fix them")


setup(
    name="umemd",
    version="0.1.0",
    description="Post-copy live migration for QEMU/KVM: the umem page daemon",
    license="GPL-2.0-only",
    python_requires=">=3.11",
    package_dir={"": "daemon"},
    packages=["umemd"],
    package_data={"umemd": ["py.typed"]},
    cffi_modules=["daemon/umemd/_abi_build.py:ffibuilder"],
    install_requires=["cffi>=1.17", "pyudev>=0.24", "qemu.qmp>=0.0.5"],
    extras_require={"plot": ["matplotlib>=3.6"]},  # umemd migrate --plot
    entry_points={"console_scripts": ["umemd = umemd.cli:main"]},
    cmdclass={"build_kmod": BuildKmod},
)
