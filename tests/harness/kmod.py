"""umem.ko for the suites that run inside the test VM: where it is, and loading it once."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.harness import CHECKOUT

IN_VM = os.environ.get("UMEM_IN_VM") == "1"  # inside the test VM a skip is a failure
KMOD = os.environ.get("UMEM_KMOD", str(CHECKOUT / "kernel" / "umem.ko"))


def module_loaded() -> bool:
    return Path("/sys/module/umem").exists()


def unload_module() -> subprocess.CompletedProcess[str]:
    """``rmmod umem``, its outcome returned (refused "in use" while anything pins the module)."""
    return subprocess.run(["rmmod", "umem"], capture_output=True, text=True)


def load_module() -> None:
    if not module_loaded():
        subprocess.run(["insmod", KMOD], check=True)
    subprocess.run(["udevadm", "settle"], check=False)
