#!/bin/bash
# tests/kbuild/kmod-tree.sh KERNEL_ROOT OUT [VAR=VALUE...]: build kernel/ with
# W=1 against the kernel installed under KERNEL_ROOT (its
# lib/modules/RELEASE/build tree, e.g. the debug kernel's), in OUT, a copy of
# kernel/'s tracked files: kernel/umem.ko stays the one built for Debian's
# kernel.  Extra make variables are passed on (UMEM_CANARY=1).  Any compiler
# warning fails the build, as `setup.py build_kmod --strict` does.
set -euo pipefail
root=$1 out=$2
shift 2
checkout=$(cd "$(dirname "$0")/../.." && pwd)
release=$(ls "$root/lib/modules" | sort -V | tail -n 1)
kdir=$root/lib/modules/$release/build
[ -d "$kdir" ] || { echo "no build tree $kdir" >&2; exit 1; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
find "$out" -mindepth 1 -delete
(cd "$checkout" && git ls-files kernel | sed 's|^kernel/||' | (cd kernel && xargs cp --parents -t "$out"))
log=$out/build.log
if ! nice -n 19 make -C "$kdir" M="$out" W=1 "$@" modules >"$log" 2>&1; then
	grep -E 'warning:|error:' "$log" | head -n 20 >&2
	echo "kernel/ against $release: build failed ($log)" >&2
	exit 1
fi
if grep -q 'warning:' "$log"; then
	grep 'warning:' "$log" | head -n 20 >&2
	echo "kernel/ against $release: W=1 warnings ($log)" >&2
	exit 1
fi
echo "kernel/ against $release${*:+ ($*)}, W=1: no warnings; $out/umem.ko"
