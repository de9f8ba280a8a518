"""Host-side tests of the patched QEMU (qemu-patches/): build, flags, migration."""
