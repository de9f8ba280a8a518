# The patched QEMU (qemu-patches/) and its host-side tests (tests/qemu/).
# Included by the top-level Makefile; see docs/qemu.md.
#
#   make qemu        build qemu-system-x86_64 with the series, or reuse the
#                    cached build (/var/cache/umem/qemu/<key>)
#   make qemu-guest  build the test guest (/var/cache/umem/guest/<key>)
#   make test-qemu   the tests in tests/qemu (needs the venv)
#   make bench-baseline
#                    upstream pre-copy, postcopy-ram and postcopy-preempt in
#                    the end-to-end topology (source on the host, destination
#                    in the test VM), 3 runs each: build/bench-baseline.json,
#                    the table in docs/performance.md. Never part of 'test'.
#
# QEMU_BIN and QEMU_DATADIR name the build's binary and its firmware
# directory (-L) for other targets; both go through the 'current' symlink
# that build.sh points at its newest good build.
#
# UMEM_QEMU_SERIES picks the QEMU release: empty for build.sh's default
# (10.2.x, the series in qemu-patches/), 10.0 for the 10.0.x build with
# qemu-patches/10.0/ (e.g. make qemu test-qemu UMEM_QEMU_SERIES=10.0).
# Every target that runs QEMU uses the build 'make qemu' made last.

UMEM_CACHE ?= $(or $(CACHE),/var/cache/umem)
QEMU_BIN := $(UMEM_CACHE)/qemu/current/bin/qemu-system-x86_64
QEMU_DATADIR := $(UMEM_CACHE)/qemu/current/share/qemu
QEMU_GUEST_DIR := $(UMEM_CACHE)/guest/current
QEMU_TEST_PYTHON ?= $(CURDIR)/.venv/bin/python
UMEM_QEMU_SERIES ?=
export UMEM_QEMU_SERIES
# The top-level 'test' target runs test-qemu when this is set.
QEMU_TESTS := 1

.PHONY: qemu qemu-guest test-qemu bench-baseline bench-e2e bench-e2e-profile

qemu:
	UMEM_CACHE=$(UMEM_CACHE) bash qemu-patches/build.sh

qemu-guest:
	UMEM_CACHE=$(UMEM_CACHE) bash tests/qemu/guest/build.sh

test-qemu: qemu qemu-guest venv
	UMEM_CACHE=$(UMEM_CACHE) UMEM_QEMU=$(QEMU_BIN) $(QEMU_TEST_PYTHON) -m pytest tests/qemu bench/test_bench.py -q

# Extra options for bench/race.py (e.g. --runs 5, --modes postcopy).
BENCH_BASELINE_ARGS ?=

bench-baseline: qemu qemu-guest venv
	UMEM_CACHE=$(UMEM_CACHE) UMEM_QEMU=$(QEMU_BIN) $(QEMU_TEST_PYTHON) -m bench.race \
		--command "$(strip make bench-baseline $(BENCH_BASELINE_ARGS))" --update-doc docs/performance.md \
		$(BENCH_BASELINE_ARGS)

# The race (issues 5 and 13): umem as the fourth mode, all four side by side, 3 runs each,
# at each guest size of BENCH_E2E_SIZES, the destination under KVM in the test VM, the
# link's limit after each round (docs/performance.md; 22 min here). A quick one:
# make bench-e2e BENCH_E2E_SIZES=512M BENCH_E2E_ARGS="--runs 1".
BENCH_E2E_SIZES ?= 512M,1G,2G
BENCH_E2E_ARGS ?=

bench-e2e: qemu qemu-guest venv abi kmod
	UMEM_CACHE=$(UMEM_CACHE) UMEM_QEMU=$(QEMU_BIN) $(QEMU_TEST_PYTHON) -m bench.race \
		--modes precopy,postcopy,postcopy-preempt,umem --section race --ram $(BENCH_E2E_SIZES) \
		--workdir build/bench-e2e --out build/bench-e2e.json \
		--command "$(strip make bench-e2e BENCH_E2E_SIZES=$(BENCH_E2E_SIZES) $(BENCH_E2E_ARGS))" \
		--update-doc docs/performance.md \
		$(BENCH_E2E_ARGS)

# Where a umem run's time goes: one umem migration with the pull under py-spy,
# then its profile by thread (build/bench-e2e-profile/umem-1/pull-1.profile).
bench-e2e-profile: qemu qemu-guest venv abi kmod
	UMEM_BENCH_PROFILE=1 UMEM_CACHE=$(UMEM_CACHE) UMEM_QEMU=$(QEMU_BIN) $(QEMU_TEST_PYTHON) -m bench.race \
		--modes umem --runs 1 --workdir build/bench-e2e-profile --out build/bench-e2e-profile.json
	$(QEMU_TEST_PYTHON) -m bench.profile_summary build/bench-e2e-profile/umem-1/pull-1.profile
