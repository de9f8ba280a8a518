#!/bin/sh
# Where the time goes: perf profiles (cpu-clock, TCG has no PMU) of one
# round-trip run and one 64 KiB-batch fill run of each kind, inside the
# test VM. `make bench-kernel-profile` writes build/profile-*.txt.
set -eu
cd "$(dirname "$0")/.."
grep -q '^umem ' /proc/modules || insmod kernel/umem.ko
for kind in umem uffd; do
	perf record -q -e cpu-clock -F 4000 -g -o /tmp/rt-$kind.data -- build/fault_bench roundtrip $kind 10000 >/dev/null
	perf report -i /tmp/rt-$kind.data --stdio --no-children --sort sym -g none --percent-limit 1 2>/dev/null |
		grep -v '^#' | grep -v '^$' > build/profile-roundtrip-$kind.txt
	perf record -q -e cpu-clock -F 4000 -g -o /tmp/fill-$kind.data -- build/fault_bench fill $kind 268435456 65536 >/dev/null
	perf report -i /tmp/fill-$kind.data --stdio --no-children --sort sym -g none --percent-limit 1 2>/dev/null |
		grep -v '^#' | grep -v '^$' > build/profile-fill-$kind.txt
done
