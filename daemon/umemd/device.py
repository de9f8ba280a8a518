"""The umem device ABI: the control node and the server fd.

Constants and struct layouts come from the kernel's uapi header through the
cffi module built from it (``umemd._umem_abi``); nothing here repeats a
number from the header. Docs: docs/kernel-abi.md.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from umemd._umem_abi import ffi, lib
from umemd.errors import (
    ApiMismatchError,
    DeviceError,
    InstanceExistsError,
    InstanceNotFoundError,
    ModuleNotLoadedError,
    ServerBusyError,
    UmemError,
)
from umemd.protocol import PAGE_SIZE

DEV_DIR = Path("/dev/umem")
CONTROL_PATH = DEV_DIR / "control"
SYSFS_CLASS = Path("/sys/class/umem")
TAG_SIZE = lib.UMEM_TAG_SIZE
NO_TAG = bytes(TAG_SIZE)
FAULT_SIZE = ffi.sizeof("struct umem_fault")
FILL_MAX_RANGES = lib.UMEM_FILL_MAX_RANGES
NAME_MAX = lib.UMEM_NAME_MAX - 1

_ERRORS_BY_ERRNO: dict[int, type[DeviceError]] = {
    errno.EEXIST: InstanceExistsError,
    errno.ENOENT: InstanceNotFoundError,
    errno.EBUSY: ServerBusyError,
}


def node_path(name: str) -> Path:
    """The instance node QEMU maps: /dev/umem/<name>."""
    return DEV_DIR / name


def _ioctl(fd: int, request: int, arg: Any, what: str) -> int:
    ffi.errno = 0
    result = int(lib.ioctl(fd, request, arg))
    if result < 0:
        err = ffi.errno
        raise _ERRORS_BY_ERRNO.get(err, DeviceError)(err, what)
    return result


def _fd_flags(nonblock: bool) -> int:
    return int(lib.UMEM_FD_CLOEXEC | (lib.UMEM_FD_NONBLOCK if nonblock else 0))


def _encode_name(name: str) -> bytes:
    raw = name.encode()
    if not 1 <= len(raw) <= NAME_MAX:
        raise DeviceError(errno.EINVAL, f"instance name {name!r} must be 1 to {NAME_MAX} bytes")
    return raw


@dataclass(frozen=True)
class InstanceInfo:
    """One entry of :meth:`Control.list`."""

    name: str
    size: int
    present: int
    served: bool
    tag: str  # hex


@dataclass(frozen=True)
class Fault:
    """A fault record read from the server fd."""

    offset: int
    write: bool


class FillResult(NamedTuple):
    """Pages made present, and pages left alone because they were present
    or another call was filling them."""

    done: int
    skipped: int


@dataclass(frozen=True)
class Stats:
    """Counters of one instance (struct umem_stats)."""

    size: int
    pages: int
    present: int
    requested: int
    faults: int
    waiters: int
    wait_ns: int
    filled: int
    zeroed: int
    skipped: int


class Control:
    """An open /dev/umem/control, past the UMEM_API handshake."""

    def __init__(self, path: Path = CONTROL_PATH) -> None:
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ModuleNotLoadedError(
                errno.ENOENT,
                f"{path} not found: the umem module is not loaded (insmod kernel/umem.ko)",
            ) from None
        except OSError as e:
            raise DeviceError(e.errno or 0, f"cannot open {path} (it is root only)") from e
        try:
            self.features, self.ioctls = self._handshake()
        except BaseException:
            os.close(self._fd)
            raise

    def _handshake(self) -> tuple[int, int]:
        api = ffi.new("struct umem_api *", {"api": lib.UMEM_API_VERSION, "features": lib.UMEM_API_FEATURES})
        try:
            _ioctl(self._fd, lib.UMEM_API, api, "UMEM_API handshake")
        except DeviceError as e:
            if e.errno == errno.EINVAL:
                raise ApiMismatchError(
                    f"the loaded umem module does not speak API {lib.UMEM_API_VERSION}: "
                    "rebuild and reload kernel/umem.ko from this checkout"
                ) from e
            raise
        return int(api.features), int(api.ioctls)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self, name: str, size: int, *, nonblock: bool = False, owner: NodeOwner | None = None,
               cgroup: Path | None = None, tag: bytes = NO_TAG) -> Server:
        """Create instance ``name`` of ``size`` bytes; return its server.

        The node is root:root 0600 unless ``owner`` says otherwise; fill
        pages are charged to ``cgroup`` (a cgroup2 directory), or else to
        the first mapper's cgroup. ``tag`` says which migration it is.
        """
        req = ffi.new("struct umem_create *", _create_fields(size, nonblock, owner, tag))
        ffi.memmove(req.name, _encode_name(name), len(name.encode()))
        what = f"cannot create umem instance {name!r} of {size} bytes"
        if cgroup is None:
            fd = _ioctl(self._fd, lib.UMEM_CREATE, req, what)
        else:
            fd = self._create_in_cgroup(req, cgroup, what)
        return Server(fd, name, size, tag)

    def _create_in_cgroup(self, req: Any, cgroup: Path, what: str) -> int:
        try:
            cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise DeviceError(e.errno or 0, f"{what}: cannot open cgroup {cgroup}") from e
        try:
            req.flags |= lib.UMEM_CREATE_CGROUP
            req.cgroup_fd = cgroup_fd
            try:
                return _ioctl(self._fd, lib.UMEM_CREATE, req, what)
            except DeviceError as e:
                if e.errno == errno.EBADF:
                    raise DeviceError(e.errno, f"{what}: {cgroup} is not a cgroup2 directory") from None
                raise
        finally:
            os.close(cgroup_fd)

    def attach(self, name: str, *, nonblock: bool = False) -> Server:
        """Become the server of existing instance ``name`` (after a restart)."""
        req = ffi.new("struct umem_attach *", {"flags": _fd_flags(nonblock)})
        ffi.memmove(req.name, _encode_name(name), len(name.encode()))
        fd = _ioctl(self._fd, lib.UMEM_ATTACH, req, f"cannot attach to umem instance {name!r}")
        server = Server(fd, name, 0, bytes(ffi.buffer(req.tag)))
        try:
            server.size = server.stats().size
        except BaseException:
            server.close()
            raise
        return server

    def destroy(self, name: str) -> None:
        """Remove instance ``name``'s node; its memory goes with its last user."""
        req = ffi.new("struct umem_destroy *")
        ffi.memmove(req.name, _encode_name(name), len(name.encode()))
        _ioctl(self._fd, lib.UMEM_DESTROY, req, f"cannot destroy umem instance {name!r}")

    def list(self) -> list[InstanceInfo]:
        """Every instance, in creation order."""
        capacity = 16
        while True:
            entries = ffi.new("struct umem_list_entry[]", capacity)
            req = ffi.new("struct umem_list *", {"entries": int(ffi.cast("uintptr_t", entries)), "capacity": capacity})
            _ioctl(self._fd, lib.UMEM_LIST, req, "cannot list umem instances")
            if req.count <= capacity:
                return [_instance_info(entries[i]) for i in range(req.count)]
            capacity = int(req.count)


@dataclass(frozen=True)
class NodeOwner:
    """Who may open an instance's node: QEMU's user and group, and the mode."""

    uid: int = 0
    gid: int = 0
    mode: int = 0o600


def _create_fields(size: int, nonblock: bool, owner: NodeOwner | None, tag: bytes) -> dict[str, Any]:
    if len(tag) != TAG_SIZE:
        raise DeviceError(errno.EINVAL, f"a umem tag is {TAG_SIZE} bytes, not {len(tag)}")
    fields: dict[str, Any] = {"argsz": ffi.sizeof("struct umem_create"), "size": size,
                              "flags": _fd_flags(nonblock), "tag": list(tag)}
    if owner is not None:
        fields.update(uid=owner.uid, gid=owner.gid, mode=owner.mode)
        fields["flags"] |= lib.UMEM_CREATE_OWNER | lib.UMEM_CREATE_MODE
    return fields


def _instance_info(entry: Any) -> InstanceInfo:
    return InstanceInfo(
        name=ffi.string(entry.name).decode(),
        size=int(entry.size),
        present=int(entry.present),
        served=bool(entry.flags & lib.UMEM_INSTANCE_SERVED),
        tag=bytes(ffi.buffer(entry.tag)).hex(),
    )


def read_counters(name: str) -> Stats:
    """Instance ``name``'s counters from sysfs: no server fd needed, so this
    works while a pull serves it."""
    directory = SYSFS_CLASS / f"umem!{name}" / "stats"
    try:
        return Stats(*(int((directory / field).read_text()) for field in Stats.__dataclass_fields__))
    except FileNotFoundError:
        if not SYSFS_CLASS.exists():
            raise ModuleNotLoadedError(errno.ENOENT, f"{SYSFS_CLASS} not found: the umem module is not loaded "
                                       "(insmod kernel/umem.ko)") from None
        raise InstanceNotFoundError(errno.ENOENT, f"no umem instance {name!r} (umemd list shows them)") from None


class Server:
    """The server fd of one instance: fault records in, pages out."""

    def __init__(self, fd: int, name: str, size: int, tag: bytes = NO_TAG) -> None:
        self._fd = fd
        self.name = name
        self.size = size
        self.tag = tag
        self.destroyed = False  # set when read() reports end of file

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_faults(self, max_records: int = 16) -> list[Fault]:
        """Read pending fault records; blocks unless the fd is non-blocking.

        Returns [] on a non-blocking fd with nothing pending, or once the
        instance is destroyed (end of file; :attr:`destroyed` is then set).
        """
        try:
            data = os.read(self._fd, max_records * FAULT_SIZE)
        except BlockingIOError:
            return []
        if not data:
            self.destroyed = True
        records = ffi.from_buffer("struct umem_fault[]", data)
        for r in records:
            if r.event != lib.UMEM_EVENT_FAULT:
                raise UmemError(f"unknown event {int(r.event):#x} from umem instance {self.name!r}: "
                                "this umemd is older than the loaded module")
        return [Fault(int(r.offset), bool(r.flags & lib.UMEM_FAULT_FLAG_WRITE)) for r in records]

    def fill(self, ranges: Iterable[tuple[int, Any]]) -> FillResult:
        """Copy each ``(offset, buffer)`` into the instance in one call.

        Buffers are page-size multiples; pages already present are skipped
        and left as they are.
        """
        keep: list[Any] = []
        spec = []
        for offset, data in ranges:
            buf = ffi.from_buffer(data)
            keep.append(buf)
            spec.append({"offset": offset, "len": len(buf), "src": int(ffi.cast("uintptr_t", buf))})
        if not spec:
            return FillResult(0, 0)
        array = ffi.new("struct umem_fill_range[]", spec)
        req = ffi.new("struct umem_fill *", {"ranges": int(ffi.cast("uintptr_t", array)), "count": len(spec)})
        _ioctl(self._fd, lib.UMEM_FILL, req, f"cannot fill {len(spec)} ranges of umem instance {self.name!r}")
        return FillResult(int(req.copied), int(req.skipped))

    def zero(self, offset: int, length: int) -> FillResult:
        """Make ``[offset, offset + length)`` present as zeros."""
        req = ffi.new("struct umem_zero *", {"offset": offset, "len": length})
        _ioctl(self._fd, lib.UMEM_ZERO, req, f"cannot zero {length} bytes at {offset:#x} of {self.name!r}")
        return FillResult(int(req.zeroed), int(req.skipped))

    def stats(self) -> Stats:
        st = ffi.new("struct umem_stats *")
        _ioctl(self._fd, lib.UMEM_STATS, st, f"cannot read stats of umem instance {self.name!r}")
        return Stats(*(int(getattr(st, f)) for f in Stats.__dataclass_fields__))

    def present_bitmap(self, start: int = 0, pages: int | None = None) -> bytes:
        """The present bits of ``pages`` pages from ``start`` (a multiple of 64),
        little-endian: bit n of the result is page start + n."""
        count = self.pages - start if pages is None else pages
        words = ffi.new("uint64_t[]", (count + 63) // 64)
        address = int(ffi.cast("uintptr_t", words))
        req = ffi.new("struct umem_bitmap *", {"start": start, "pages": count, "bitmap": address})
        _ioctl(self._fd, lib.UMEM_BITMAP, req, f"cannot read the present bitmap of {self.name!r}")
        return bytes(ffi.buffer(words))

    def missing_pages(self) -> Iterator[int]:
        """Indices of the pages not yet present, in order."""
        for index, byte in enumerate(self.present_bitmap()):
            if byte == 0xFF:
                continue
            for bit in range(8):
                page = index * 8 + bit
                if page < self.pages and not byte >> bit & 1:
                    yield page
