"""Host-side tests of --kernel-root: a kernel installed under a directory (no VM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.vm import initramfs, qemu


def install(root: Path, release: str) -> None:
    (root / "boot").mkdir(parents=True, exist_ok=True)
    (root / "boot" / f"vmlinuz-{release}").write_bytes(b"bzImage")
    (root / "lib" / "modules" / release).mkdir(parents=True)
    (root / "lib" / "modules" / release / "modules.dep").write_text("")


def test_find_kernel_in_takes_the_newest_release_under_root(tmp_path: Path) -> None:
    install(tmp_path, "6.1.192-umem-debug")
    install(tmp_path, "6.17.9+deb14-amd64")
    (tmp_path / "lib" / "modules" / "6.99.0-no-vmlinuz").mkdir()
    kernel = initramfs.find_kernel_in(tmp_path)
    assert kernel.release == "6.17.9+deb14-amd64"
    assert kernel.vmlinuz == tmp_path / "boot" / "vmlinuz-6.17.9+deb14-amd64"
    assert kernel.modules_dir == tmp_path / "lib" / "modules" / "6.17.9+deb14-amd64"
    assert initramfs.find_kernel_in(tmp_path, "6.1.192-umem-debug").release == "6.1.192-umem-debug"
    with pytest.raises(initramfs.InitramfsError, match=r"no kernel 6\.2 "):
        initramfs.find_kernel_in(tmp_path, "6.2")


def run_conf(kernel: initramfs.Kernel) -> dict[str, str]:
    cfg = qemu.VMConfig(kernel=kernel, initramfs=Path("/nonexistent"), checkout=Path("/c"),
                        command=["true"])
    text = qemu.run_files(cfg)["etc/umem-vm/run.conf"].decode()
    return dict(line.split("=", 1) for line in text.splitlines() if not line.startswith("set "))


def test_a_kernel_under_a_root_has_its_modules_bound_in_the_guest(tmp_path: Path) -> None:
    install(tmp_path, "6.1.192-umem-debug")
    conf = run_conf(initramfs.find_kernel_in(tmp_path))
    assert conf["UMEM_VM_MODULES"] == str(tmp_path / "lib" / "modules" / "6.1.192-umem-debug")
    assert conf["UMEM_VM_RELEASE"] == "6.1.192-umem-debug"


def test_the_hosts_kernel_needs_no_bind() -> None:
    kernel = initramfs.Kernel("6.1.0-57-amd64", Path("/boot/vmlinuz-6.1.0-57-amd64"),
                              Path("/lib/modules/6.1.0-57-amd64"))
    assert run_conf(kernel)["UMEM_VM_MODULES"] == "''"
