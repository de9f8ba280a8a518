"""Build the cffi binding of the umem ABI from the kernel's uapi header.

The header, kernel/include/uapi/linux/umem.h, is the one source of truth:
this script turns its integer macros and structs into a cffi ``cdef``
(values left as ``...`` for the C compiler to fill in), so no ioctl number
or struct layout is ever typed in Python. setup.py runs it (cffi_modules):
``python setup.py build_ext --inplace`` builds ``umemd/_umem_abi*.so``.
"""

from __future__ import annotations

import re
from pathlib import Path

from cffi import FFI

HEADER = Path(__file__).resolve().parents[2] / "kernel" / "include" / "uapi" / "linux" / "umem.h"

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_DEFINE = re.compile(r"^#define[ \t]+(\w+)[ \t]+(\S.*)$", re.M)
_STRUCT = re.compile(r"^struct\s+\w+\s*\{.*?^\};", re.M | re.S)
_SYMBOLIC_DIM = re.compile(r"\[\s*[A-Za-z_]\w*\s*\]")

_PRELUDE = """
typedef int... __u8;
typedef int... __u16;
typedef int... __u32;
typedef int... __u64;
typedef int... __s32;
int ioctl(int fd, unsigned long request, ...);
"""


def header_cdef(text: str) -> str:
    """Return a cffi cdef for the integer macros and structs in ``text``."""
    text = _COMMENT.sub("", text).replace("\\\n", " ")
    defines = [f"#define {name} ..." for name, _value in _DEFINE.findall(text)]
    structs = [_SYMBOLIC_DIM.sub("[...]", s) for s in _STRUCT.findall(text)]
    return "\n".join([_PRELUDE, *defines, *structs])


def make_builder() -> FFI:
    ffibuilder = FFI()
    ffibuilder.cdef(header_cdef(HEADER.read_text()))
    ffibuilder.set_source(
        "umemd._umem_abi",
        '#include <sys/ioctl.h>\n#include "linux/umem.h"\n',
        include_dirs=[str(HEADER.parents[1])],
    )
    return ffibuilder


ffibuilder = make_builder()
