#!/bin/sh
# tests/kbuild/suite-in-vm.sh KO [PYTEST_ARG...]: the kernel suite on a kernel
# other than Debian 12's (make test-kernel-debug, -debug-canary, -newest), run
# inside the test VM: load KO, fire the canary if KO was built with it
# (UMEM_CANARY=1; $UMEM_CANARY_MODE, default 1, is what it is sent: 1 for
# the lock inversion and use-after-free, leak for a leak), run tests/kernel
# (the stress test included; $UMEM_SUITE narrows it), then, on a kmemleak
# kernel, scan for leaks and fail on any report that names umem.
set -u
ko=$1
shift
leaks=/sys/kernel/debug/kmemleak
# Reports from before the module was loaded are not ours.
[ -e "$leaks" ] && echo clear >"$leaks"
insmod "$ko" || exit 1
udevadm settle
if [ -e /sys/module/umem/parameters/canary ]; then
	echo "suite-in-vm: firing the canary: ${UMEM_CANARY_MODE:-1}"
	echo "${UMEM_CANARY_MODE:-1}" >/sys/module/umem/parameters/canary
fi
python -m pytest "${UMEM_SUITE:-tests/kernel}" "$@"
rc=$?
[ -e "$leaks" ] || exit $rc

# kmemleak reports an object only once it has been unreferenced for a while
# and seen so by two scans.
for pass in 1 2; do
	sleep 6
	echo scan >"$leaks" 2>/dev/null || {
		echo "suite-in-vm: kmemleak is disabled (see the console): its scan would prove nothing"
		exit 1
	}
done
report=${TMPDIR:-/tmp}/kmemleak.txt
cat "$leaks" >"$report"
total=$(grep -c '^unreferenced object' "$report")
ours=$(awk '/^unreferenced object/ {if (blk ~ /\[umem\]|umem_/) n++; blk = ""} {blk = blk "\n" $0}
	END {if (blk ~ /\[umem\]|umem_/) n++; print n + 0}' "$report")
echo "suite-in-vm: kmemleak: $total unreferenced object(s) after the suite, $ours of them umem's"
if [ "$ours" != 0 ]; then
	cat "$report"
	[ "$rc" = 0 ] && rc=1
elif [ "$total" != 0 ]; then
	echo "suite-in-vm: kmemleak: the others (not umem's), for the record:"
	grep -A1 -E '^unreferenced object' "$report" | head -n 40
fi
exit $rc
