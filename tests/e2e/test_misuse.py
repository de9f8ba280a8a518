"""Misuse in the real topology is a clear error that names the fix, never a
hang or a guest on empty memory."""

from __future__ import annotations

import asyncio
import shlex
import subprocess
import time
from pathlib import Path

from tests.harness import CHECKOUT
from tests.harness.command import VENV_PYTHON, umemd_command
from tests.harness.driver import Driver
from tests.harness.kmod import KMOD
from tests.harness.machine import qemu_base_args
from tests.harness.umem import UmemSide, insmod_on
from umemd.protocol import PAGE_SIZE


def run_in_vm(vm: Driver, *argv: str, limit: float = 120) -> tuple[int, str]:
    reply = vm.run(vm.topo.agent.request("run", timeout=limit + 10, argv=list(argv), limit=limit))
    return int(reply["returncode"]), str(reply["output"])


def test_pull_without_the_module_exits_3_and_says_how_to_load_it(vm: Driver, workdir: Path) -> None:
    key = workdir / "key"
    key.write_text("ab" * 32 + "\n")
    key.chmod(0o600)  # umemd refuses a key others can read
    _, out = run_in_vm(vm, "sh", "-c", f"""
        rmmod umem 2>/dev/null
        {shlex.join(umemd_command("pull", "vm9", "--size", "1M", "--listen", "127.0.0.1:4999",
                                  "--key-file", str(key), "--migration-id", "00" * 16, python=VENV_PYTHON))}
        echo "rc=$?"
        insmod {KMOD}""")
    assert "rc=3" in out, out
    assert "/dev/umem/control not found" in out and "insmod" in out, out


def destination_qemu(vm: Driver, mem_path: str) -> tuple[int, str]:
    backend = f"memory-backend-file,id=ram0,size=64M,mem-path={mem_path},share=on,postcopy-device=on"
    return run_in_vm(vm, *qemu_base_args(), "-m", "64M", "-postcopy", "-incoming", "defer",
                     "-object", backend, "-machine", "memory-backend=ram0")


def test_destination_qemu_refuses_a_missing_node(vm: Driver) -> None:
    vm.run(insmod_on(vm.topo))
    rc, out = destination_qemu(vm, "/dev/umem/not-created")
    assert rc == 1, out
    assert "does not exist; create the post-copy device first" in out
    rc, out = run_in_vm(vm, "test", "-e", "/dev/umem/not-created")
    assert rc != 0, "QEMU created a file where the node was missing"


def test_destination_qemu_refuses_a_regular_file(vm: Driver) -> None:
    assert run_in_vm(vm, "truncate", "-s", "64M", "/tmp/not-a-device")[0] == 0
    rc, out = destination_qemu(vm, "/tmp/not-a-device")
    assert rc == 1, out
    assert "is not a character device" in out


def test_migrate_without_a_pull_daemon_says_what_to_start(vm: Driver, workdir: Path) -> None:
    side = UmemSide(vm.topo, workdir, "vm9", 64 << 20)
    started = time.monotonic()
    p = subprocess.run(side.migrate_argv("--ready-timeout", "3"), cwd=CHECKOUT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1, p.stderr
    assert "no umemd pull status" in p.stderr and "start `umemd pull" in p.stderr, p.stderr
    assert time.monotonic() - started < 30


def test_a_page_server_with_the_wrong_key_gets_nothing(vm: Driver, workdir: Path) -> None:
    side = UmemSide(vm.topo, workdir, "wrongkey", 64 << 20)
    side.ram_file.write_bytes(b"\x5a" * (64 << 20))
    wrong = workdir / "wrong.key"
    wrong.write_text("cd" * 32 + "\n")
    wrong.chmod(0o600)

    async def attempt() -> None:
        await insmod_on(vm.topo)
        await side.start_pull()
        serve = subprocess.Popen(umemd_command("serve", str(side.ram_file), "--connect",
                                               f"127.0.0.1:{vm.topo.host_port('umem-page')}", "--key-file", str(wrong),
                                               "--migration-id", side.migration_id, "--guest-stopped-for-good"),
                                 cwd=CHECKOUT, stderr=subprocess.PIPE, text=True)
        try:
            _, err = await asyncio.to_thread(serve.communicate, timeout=300)
            assert serve.returncode == 1, "a serve with the wrong key must give up, not retry for ever:\n" + err
            assert await side.missing_pages() == (64 << 20) // PAGE_SIZE, "a page arrived from a peer without the key"
        finally:
            serve.kill()
            await side.stop()
        assert "authentication failed" in err and "--key-file" in err, err

    vm.run(attempt())


def test_a_page_server_of_another_migration_is_refused_and_exits_1(vm: Driver, workdir: Path) -> None:
    side = UmemSide(vm.topo, workdir, "stale", 64 << 20)
    side.ram_file.write_bytes(b"\xbb" * (64 << 20))  # another guest's RAM, of the same size

    async def attempt() -> None:
        await insmod_on(vm.topo)
        await side.start_pull()
        stale_id = "ee" * 16
        serve = subprocess.Popen(umemd_command("serve", str(side.ram_file), "--connect",
                                               f"127.0.0.1:{vm.topo.host_port('umem-page')}",
                                               "--key-file", str(side.key), "--migration-id", stale_id,
                                               "--guest-stopped-for-good"),
                                 cwd=CHECKOUT, stderr=subprocess.PIPE, text=True)
        try:
            _, err = await asyncio.to_thread(serve.communicate, timeout=300)
            assert serve.returncode == 1, err
            assert f"migration {side.migration_id}" in err and stale_id in err, err
            assert await side.missing_pages() == (64 << 20) // PAGE_SIZE, "a page arrived from another migration"
        finally:
            serve.kill()
            await side.stop()

    vm.run(attempt())
