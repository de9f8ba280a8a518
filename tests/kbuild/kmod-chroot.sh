#!/bin/bash
# tests/kbuild/kmod-chroot.sh CHROOT RELEASE LOG [OUT [VAR=VALUE...]]: build kernel/ with W=1
# inside CHROOT (tests/kbuild/chroot.sh made it) against the headers of kernel
# RELEASE there (linux-headers-RELEASE),
# with that release's compiler; fail on any compiler warning, as
# `setup.py build_kmod --strict` does for the host's kernel.  The sources are
# copied into CHROOT/build/umem: nothing in the checkout is written; with
# OUT, the module is copied to OUT/umem.ko (for the VM to load).  Extra make
# variables are passed on (UMEM_TEST_HOOKS=1).
set -euo pipefail
root=$1 release=$2 log=$3 out=${4:-}
shift $(($# < 4 ? $# : 4))
checkout=$(cd "$(dirname "$0")/../.." && pwd)
[ -d "$root/lib/modules/$release/build" ] || { echo "no kernel headers in $root" >&2; exit 1; }
rm -rf "$root/build/umem"
mkdir -p "$root/build/umem"
(cd "$checkout" && git ls-files kernel | sed 's|^kernel/||' |
	(cd kernel && xargs cp --parents -t "$root/build/umem"))
set +e
# objtool reads /proc: a private one, gone with the build's namespace.
unshare --mount --pid --fork --mount-proc="$root/proc" chroot "$root" make -C "/lib/modules/$release/build" M=/build/umem W=1 "$@" -k modules >"$log" 2>&1
rc=$?
set -e
gcc=$(chroot "$root" gcc -dumpfullversion)
warnings=$(grep -c 'warning:' "$log" || true)
echo "kernel/ against $release (gcc $gcc), W=1: exit $rc, $warnings warning lines; log $log"
if [ "$rc" != 0 ] || [ "$warnings" != 0 ]; then
	grep -E 'warning:|error:' "$log" | head -n 20 >&2
	exit 1
fi
if [ -n "$out" ]; then
	mkdir -p "$out"
	cp "$root/build/umem/umem.ko" "$out/umem.ko"
fi
