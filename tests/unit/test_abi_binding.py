"""The cffi binding is generated from the uapi header and matches it."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from umemd import ModuleNotLoadedError
from umemd._abi_build import HEADER, header_cdef
from umemd._umem_abi import ffi, lib
from umemd.device import Control


def test_every_ioctl_in_the_header_is_in_the_binding() -> None:
    names = re.findall(r"^#define\s+(UMEM_[A-Z_]+)\s+_IO[WR]{0,2}\(", HEADER.read_text(), re.M)
    assert {"UMEM_API", "UMEM_CREATE", "UMEM_FILL", "UMEM_BITMAP"} <= set(names)
    for name in names:
        assert getattr(lib, name) > 0, name


def test_struct_sizes_match_the_kernels_build_bug_ons() -> None:
    # kernel/control.c pins the same sizes with BUILD_BUG_ON.
    control_c = (HEADER.parents[3] / "control.c").read_text()
    pinned = re.findall(r"BUILD_BUG_ON\(sizeof\(struct (\w+)\) != (\d+)\)", control_c)
    assert len(pinned) >= 10
    for struct, size in pinned:
        assert ffi.sizeof(f"struct {struct}") == int(size), struct
    assert "BUILD_BUG_ON(sizeof(struct umem_create) != UMEM_CREATE_SIZE_VER0)" in control_c
    assert ffi.sizeof("struct umem_create") == lib.UMEM_CREATE_SIZE_VER0


def test_cdef_leaves_values_to_the_compiler() -> None:
    cdef = header_cdef(HEADER.read_text())
    assert "#define UMEM_CREATE ..." in cdef
    assert "__u8 name[...];" in cdef
    assert not re.search(r"#define \w+ [^.\s]", cdef), "a literal value leaked into the cdef"


def test_missing_control_node_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ModuleNotLoadedError) as info:
        Control(tmp_path / "control")
    assert info.value.errno == errno.ENOENT
    assert "insmod kernel/umem.ko" in str(info.value)
