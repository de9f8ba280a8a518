"""Find the Debian kernel and build (and cache) the test VM's initramfs.

The initramfs holds only what the generated init needs before the host root is
mounted: a static busybox, ``init.sh`` as ``/init`` and the modules that mount
9p over virtio plus overlayfs and virtio_console (the exit-status port).  Every
other module is loaded with the host's own ``modprobe`` once the host root is
mounted, because the guest boots the very kernel whose modules live there.

The archive is a gzip-compressed newc cpio written here in Python, cached
under the cache directory and keyed by kernel release, the modules.dep stamp,
busybox and a hash of this file and ``init.sh``.  Per-run settings go in a
second, tiny archive (:func:`run_archive`) that is appended at boot: the
kernel unpacks concatenated archives in order.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

INIT_SCRIPT = Path(__file__).with_name("init.sh")
BUSYBOX = Path("/bin/busybox")
DEFAULT_CACHE_DIR = Path("/var/cache/umem/vm")

# Modules the init loads itself, before the host root is mounted; their
# dependencies are found through modules.dep.
INITRAMFS_MODULES = (
    "virtio_pci",  # the PCI transport of every virtio device below
    "9pnet_virtio",  # 9p over virtio (pulls in 9pnet)
    "9p",  # the 9p filesystem (pulls in netfs and fscache)
    "overlay",  # the tmpfs overlay over the read-only host root
    "virtio_console",  # virtio-serial: the exit-status port
)

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


class InitramfsError(Exception):
    """The kernel, its modules or busybox cannot be found or used."""


@dataclass(frozen=True)
class Kernel:
    release: str
    vmlinuz: Path
    modules_dir: Path


def _version_key(release: str) -> list[tuple[int, str]]:
    """Natural sort key: "6.1.0-10" sorts before "6.1.0-9"'s successor."""
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"(\d+)", release)]


def find_kernel(release: str | None = None, boot: Path = Path("/boot"),
                modules_root: Path = Path("/lib/modules")) -> Kernel:
    """Return the newest kernel with both a vmlinuz and a modules directory."""
    found = []
    for mod_dir in modules_root.glob("*/"):
        vmlinuz = boot / f"vmlinuz-{mod_dir.name}"
        if (mod_dir / "modules.dep").is_file() and vmlinuz.is_file():
            found.append(Kernel(mod_dir.name, vmlinuz, mod_dir))
    if release is not None:
        found = [k for k in found if k.release == release]
    if not found:
        wanted = f" {release}" if release else ""
        raise InitramfsError(
            f"no kernel{wanted} with both {boot}/vmlinuz-RELEASE and "
            f"{modules_root}/RELEASE/modules.dep (apt-get install linux-image-amd64)")
    return max(found, key=lambda k: _version_key(k.release))


def find_kernel_in(root: Path, release: str | None = None) -> Kernel:
    """The newest kernel installed under ``root`` as under ``/``: ROOT/boot/vmlinuz-RELEASE
    and ROOT/lib/modules/RELEASE (a debug kernel's ``make install``/``modules_install``
    output, or a newer Debian kernel's packages unpacked there)."""
    return find_kernel(release, root / "boot", root / "lib" / "modules")


def module_name(path: str) -> str:
    """kernel/fs/9p/9p.ko.xz -> 9p; kvm-amd.ko -> kvm_amd."""
    base = path.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """Map module name -> (path, paths of its dependencies) from modules.dep."""
    result = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, deps = line.partition(":")
        result[module_name(path)] = (path.strip(), deps.split())
    return result


def load_order(wanted: Iterable[str], deps: dict[str, tuple[str, list[str]]],
               builtin: Collection[str] = ()) -> list[str]:
    """Module paths in an order insmod accepts: every dependency first."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in chain:
            raise InitramfsError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in deps:
            if name in builtin:
                return
            raise InitramfsError(f"module {name} is neither in modules.dep nor built in")
        path, dep_paths = deps[name]
        for dep in dep_paths:
            visit(module_name(dep), (*chain, name))
        seen.add(name)
        order.append(path)

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return order


def read_module(path: Path) -> bytes:
    """The module's ELF bytes, decompressed if the kernel ships .ko.xz/.zst/.gz."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        if shutil.which("zstd") is None:
            raise InitramfsError(f"{path} is zstd-compressed: apt-get install zstd")
        return subprocess.run(["zstd", "-dc", str(path)], check=True,
                              capture_output=True).stdout
    return data


class CpioWriter:
    """Minimal writer of the "newc" cpio format the kernel unpacks."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"",
               rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.strip("/")
        fields = (self._ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._write_padded(header + name.encode() + b"\0")
        self._write_padded(data)

    def _write_padded(self, data: bytes) -> None:
        self._buf.write(data)
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def mkdir(self, name: str, mode: int = 0o755) -> None:
        """Add a directory and any missing parents."""
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            path = "/".join(parts[:i])
            if path and path not in self._dirs:
                self._dirs.add(path)
                self._entry(path, stat.S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.mkdir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.mkdir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.mkdir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._buf.getvalue()


def _busybox_applets() -> list[str]:
    out = subprocess.run([str(BUSYBOX), "--list"], check=True, capture_output=True,
                         text=True).stdout
    return [a for a in out.split() if "/" not in a and a != "busybox"]


def build_initramfs(kernel: Kernel) -> bytes:
    """The gzip-compressed base initramfs for ``kernel`` (uncached)."""
    if not BUSYBOX.is_file():
        raise InitramfsError(f"{BUSYBOX} missing: apt-get install busybox-static")
    deps = parse_modules_dep((kernel.modules_dir / "modules.dep").read_text())
    builtin_file = kernel.modules_dir / "modules.builtin"
    builtin = ({module_name(p) for p in builtin_file.read_text().split()}
               if builtin_file.is_file() else set())
    cpio = CpioWriter()
    for d in ("dev", "proc", "sys", "tmp", "mnt/host", "mnt/root", "mnt/rw"):
        cpio.mkdir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in _busybox_applets():
        cpio.symlink(f"bin/{applet}", "busybox")
    cpio.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    order = []
    for path in load_order(INITRAMFS_MODULES, deps, builtin):
        dest = f"lib/modules/{module_name(path)}.ko"
        cpio.file(dest, read_module(kernel.modules_dir / path))
        order.append("/" + dest)
    cpio.file("etc/umem-vm/modules", "".join(f"{p}\n" for p in order).encode())
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


def cache_key(kernel: Kernel) -> str:
    """Everything the base initramfs depends on, hashed."""
    h = hashlib.sha256()
    for path in (Path(__file__), INIT_SCRIPT):
        h.update(path.read_bytes())
    for path in (BUSYBOX, kernel.modules_dir / "modules.dep"):
        st = path.stat()
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cached_initramfs(kernel: Kernel, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Path of the cached base initramfs, built on first use."""
    path = cache_dir / f"initramfs-{kernel.release}-{cache_key(kernel)}.cpio.gz"
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    data = build_initramfs(kernel)
    with tempfile.NamedTemporaryFile(dir=cache_dir, prefix=".initramfs-", delete=False) as f:
        f.write(data)
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)
    for old in cache_dir.glob(f"initramfs-{kernel.release}-*.cpio.gz"):
        if old != path:
            old.unlink(missing_ok=True)
    return path


def run_archive(files: dict[str, bytes]) -> bytes:
    """A small gzip-compressed archive of per-run files to append to the base."""
    cpio = CpioWriter()
    for name, data in sorted(files.items()):
        cpio.file(name, data)
    return gzip.compress(cpio.finish(), compresslevel=1, mtime=0)
