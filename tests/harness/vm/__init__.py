"""The umem test VM: run a command under the Debian kernel in QEMU.

Modules: :mod:`.initramfs` (kernel discovery, initramfs build and cache),
:mod:`.qemu` (QEMU command line, the run loop, accelerator choice),
:mod:`.console` (the kernel console check), ``init.sh`` (the guest's PID 1)
and ``__main__`` (the CLI).
See docs/testing.md.
"""
