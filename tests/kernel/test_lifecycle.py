"""Create, list, attach and destroy instances; their nodes come and go."""

from __future__ import annotations

import errno
import grp
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import pyudev

from umemd import Control, InstanceExistsError, InstanceNotFoundError, NodeOwner, Server, ServerBusyError, node_path
from umemd.device import CONTROL_PATH, DeviceError


@pytest.fixture
def udev_monitor() -> pyudev.Monitor:
    monitor = pyudev.Monitor.from_netlink(pyudev.Context())
    monitor.filter_by("umem")
    monitor.start()
    return monitor


def next_event(monitor: pyudev.Monitor) -> pyudev.Device:
    device = monitor.poll(timeout=10)
    assert device is not None, "no udev event within 10 s"
    return device


def test_control_node_is_root_only() -> None:
    st = os.stat(CONTROL_PATH)
    assert stat.S_ISCHR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == 0


def test_node_appears_with_the_owner_and_mode_of_create_after_udev_then_goes(
    control: Control, udev_monitor: pyudev.Monitor
) -> None:
    kvm = grp.getgrnam("kvm").gr_gid
    server = control.create("udev-node", 1 << 20, owner=NodeOwner(4242, kvm, 0o640))
    added = next_event(udev_monitor)
    assert added.action == "add" and added.sys_path.endswith("/umem!udev-node")
    assert added.device_node == str(node_path("udev-node"))
    assert (added.properties["DEVUID"], added.properties["DEVGID"], added.properties["DEVMODE"]) == (
        "4242", str(kvm), "0640")
    subprocess.run(["udevadm", "settle"], check=False)  # udev has applied its rules
    st = os.stat(node_path("udev-node"))
    assert stat.S_ISCHR(st.st_mode)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4242, kvm, 0o640)

    control.destroy("udev-node")
    removed = next_event(udev_monitor)
    assert removed.action == "remove" and removed.sys_path.endswith("/umem!udev-node")
    assert not node_path("udev-node").exists()
    server.close()


def test_llseek_reports_the_size(make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=5 << 20)
    fd = os.open(node_path(server.name), os.O_RDWR)
    try:
        assert os.lseek(fd, 0, os.SEEK_END) == 5 << 20
        assert os.lseek(fd, 4096, os.SEEK_SET) == 4096
    finally:
        os.close(fd)


def test_list_shows_each_instance(control: Control, make_instance: Callable[..., Server]) -> None:
    a = make_instance(size=1 << 20)
    b = make_instance(size=2 << 20)
    b.close()
    listed = {i.name: i for i in control.list()}
    assert listed[a.name].size == 1 << 20 and listed[a.name].served
    assert listed[b.name].size == 2 << 20 and not listed[b.name].served
    assert listed[a.name].present == 0


def test_list_grows_past_its_first_buffer(control: Control, make_instance: Callable[..., Server]) -> None:
    made = {make_instance(size=4096).name for _ in range(20)}
    assert made <= {i.name for i in control.list()}


def test_duplicate_name_is_refused(make_instance: Callable[..., Server], control: Control) -> None:
    server = make_instance()
    with pytest.raises(InstanceExistsError) as info:
        control.create(server.name, 1 << 20)
    assert info.value.errno == errno.EEXIST


@pytest.mark.parametrize("name", ["control", ".", "..", "a/b", "sp ace", "x" * 64, "é", "a!b"])
def test_reserved_and_invalid_names_are_refused(control: Control, name: str) -> None:
    with pytest.raises(DeviceError) as info:
        control.create(name, 1 << 20)
    assert info.value.errno == errno.EINVAL


def test_longest_valid_name(make_instance: Callable[..., Server]) -> None:
    server = make_instance(name="A-z_0.9" + "x" * 56)
    assert node_path(server.name).exists()


def test_attach_needs_the_server_gone(control: Control, make_instance: Callable[..., Server]) -> None:
    server = make_instance()
    with pytest.raises(ServerBusyError):
        control.attach(server.name)
    server.close()
    with control.attach(server.name) as again:
        assert again.size == 1 << 20
        with pytest.raises(ServerBusyError):
            control.attach(server.name)


def test_attach_and_destroy_unknown_name(control: Control) -> None:
    with pytest.raises(InstanceNotFoundError):
        control.attach("no-such-instance")
    with pytest.raises(InstanceNotFoundError):
        control.destroy("no-such-instance")


def test_destroyed_name_can_be_reused(control: Control) -> None:
    first = control.create("reuse", 1 << 20)
    control.destroy("reuse")
    second = control.create("reuse", 2 << 20)
    assert second.stats().size == 2 << 20
    control.destroy("reuse")
    first.close()
    second.close()


def pages_allocated() -> int:
    """Every page the page allocator has handed out since boot (/proc/vmstat pgalloc_*)."""
    fields = (line.split() for line in Path("/proc/vmstat").read_text().splitlines())
    return sum(int(value) for key, value in fields if key.startswith("pgalloc_"))


def test_a_create_refused_for_its_size_allocates_nothing_first(control: Control) -> None:
    """1 TiB cannot be committed in the test VM: ENOMEM, found before the
    bitmaps (96 MiB for 1 TiB) are allocated only to be freed."""
    before = pages_allocated()
    with pytest.raises(DeviceError) as info:
        control.create(f"doomed{os.getpid()}", 1 << 40)
    allocated = pages_allocated() - before
    assert info.value.errno == errno.ENOMEM
    assert allocated < 4096, f"a CREATE refused with ENOMEM allocated {allocated} pages first"
