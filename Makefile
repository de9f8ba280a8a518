# umem: post-copy live migration for QEMU/KVM.
#
# The README's two commands are `make demo` and `make test`; both set up
# everything they need (apt packages, the venv, the cffi binding, the kernel
# module, the QEMU build), idempotently. `make help` lists the rest.

SHELL := /bin/bash
.DEFAULT_GOAL := help

CACHE ?= /var/cache/umem
VENV := .venv
PY := $(CURDIR)/$(VENV)/bin/python
BUILD := build

APT_PACKAGES := qemu-system-x86 busybox-static linux-image-amd64 linux-headers-amd64 \
	kmod udev dkms iproute2 gcc make python3-venv

KDIR = $(shell ls -d /lib/modules/*/build 2>/dev/null | sort -V | tail -n 1)
KERNEL_SOURCES := $(wildcard kernel/*.c kernel/*.h) kernel/Kbuild kernel/Makefile \
	kernel/include/uapi/linux/umem.h

PYTEST_ARGS ?= -q
VM := $(PY) -m tests.harness.vm
# $(call vm-kernel-args,UMEM_KO): the test VM for a suite that loads that module.
vm-kernel-args = --console-log $(BUILD)/vm-kernel-console.log --udev --env UMEM_KMOD=$(CURDIR)/$(1) --env UMEM_IN_VM=1
VM_KERNEL_ARGS := $(call vm-kernel-args,kernel/umem.ko)

-include qemu-patches/qemu.mk

.PHONY: help setup apt venv abi kmod check lint layout unit kmod-strict dkms-check test test-kernel \
	kbuild-apt debug-kernel test-kernel-debug test-kernel-debug-canary chroots kmod-newer \
	test-kernel-newest \
	bench-kernel bench-kernel-profile bench-daemon bench-daemon-profile demo demo-banner \
	test-e2e test-chaos clean

help:
	@echo "make demo         a real post-copy migration of a small guest, with a report"
	@echo "make test         the whole suite: host checks, kernel suite in a VM, QEMU, end to end, debug/newer kernels"
	@echo "make check        fast host-only lane: lint, types, the layout rules, unit tests, module built with W=1"
	@echo "make test-kernel  the kernel suite alone, inside a VM booting Debian's kernel"
	@echo "make test-daemon  umemd serve/pull on the real device, inside the VM"
	@echo "make test-e2e     real guests migrated into the VM with umem: normal, recovery, misuse"
	@echo "make test-chaos   20+ migrations under random faults (CHAOS_SEED, CHAOS_RUNS): not in make test"
	@echo "make bench-e2e    umem vs pre-copy, postcopy-ram and postcopy-preempt, 3 runs each"
	@echo "make bench-kernel umem fault round trip and fill throughput vs userfaultfd (one VM boot)"
	@echo "make bench-daemon umemd push vs raw TCP, fault latency with/without push, pre-paging (one VM boot)"
	@echo "make setup        install apt packages, the venv, the cffi binding and the module"
	@echo "make test-kernel-debug         the kernel suite on a KASAN/lockdep/kmemleak build of Debian's 6.1"
	@echo "make test-kernel-debug-canary  the same lane must fail on planted bugs (KASAN + lockdep reports)"
	@echo "make kmod-newer   the module built with W=1 against Debian 13's and the newest Debian kernel"
	@echo "make test-kernel-newest        the kernel suite in a VM booting the newest Debian kernel"

setup: apt venv abi kmod

# Debian packages: installed only when one is missing. $(call apt-install,PACKAGES)
define apt-install
	@missing=$$(for p in $(1); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
endef

apt:
	$(call apt-install,$(APT_PACKAGES))
	@ls -d /lib/modules/*/build >/dev/null 2>&1 || { \
		echo "no kernel build tree under /lib/modules: linux-headers-amd64 did not install" >&2; exit 1; }

venv: $(VENV)/.stamp

$(VENV)/.stamp: daemon/requirements.txt setup.py pyproject.toml | apt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r daemon/requirements.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

# The cffi binding, rebuilt whenever the uapi header changes.
abi: $(BUILD)/abi.stamp

$(BUILD)/abi.stamp: kernel/include/uapi/linux/umem.h daemon/umemd/_abi_build.py $(VENV)/.stamp
	@mkdir -p $(BUILD)
	$(PY) setup.py -q build_ext --inplace >/dev/null
	touch $@

kmod: kernel/umem.ko

kernel/umem.ko: $(KERNEL_SOURCES) | apt venv
	$(PY) setup.py -q build_kmod

kmod-strict: apt venv
	$(MAKE) -C kernel clean >/dev/null
	$(PY) setup.py -q build_kmod --strict

lint: abi
	$(VENV)/bin/ruff check daemon tests bench setup.py
	$(VENV)/bin/mypy

unit: abi
	$(PY) -m pytest tests/unit tests/layout -q

# The import rule and one definition of each shared helper (docs/architecture.md#the-layout-and-the-import-rule).
layout: venv
	$(PY) -m tests.layout

# dkms add/build of kernel/ against the installed headers, in a private tree.
dkms-check: apt
	rm -rf $(BUILD)/dkms && mkdir -p $(BUILD)/dkms/tree $(BUILD)/dkms/src/umem-0.1.0
	git ls-files kernel | sed 's|^kernel/||' | (cd kernel && xargs cp --parents -t $(CURDIR)/$(BUILD)/dkms/src/umem-0.1.0)
	dkms --dkmstree $(CURDIR)/$(BUILD)/dkms/tree --sourcetree $(CURDIR)/$(BUILD)/dkms/src add umem/0.1.0 >/dev/null
	dkms --dkmstree $(CURDIR)/$(BUILD)/dkms/tree --sourcetree $(CURDIR)/$(BUILD)/dkms/src \
		build umem/0.1.0 -k $(notdir $(patsubst %/build,%,$(KDIR))) >/dev/null
	@echo "dkms add/build of kernel/ against $(KDIR): ok"

check: lint layout unit kmod-strict dkms-check
	@echo "make check: lint, types, the layout rules, unit tests and the W=1 module build passed"

$(BUILD)/kvm_guest: tests/kernel/kvm_guest.c | apt
	@mkdir -p $(BUILD)
	gcc -O2 -Wall -Wextra -Werror -o $@ $<

$(BUILD)/fault_flood: tests/kernel/fault_flood.c | apt
	@mkdir -p $(BUILD)
	gcc -O2 -Wall -Wextra -Werror -o $@ $< -lpthread

# The helper binaries the kernel suite runs, on whichever kernel it runs.
KERNEL_SUITE_BINS := $(BUILD)/kvm_guest $(BUILD)/fault_flood

# The kernel suite runs on the module built with its park points (kernel/testhooks.c,
# UMEM_TEST_HOOKS=1: dormant until a test arms one); every other lane loads kernel/umem.ko.
KMOD_HOOKS := $(BUILD)/kmod-hooks/umem.ko

$(KMOD_HOOKS): $(KERNEL_SOURCES) | apt
	tests/kbuild/kmod-tree.sh / $(BUILD)/kmod-hooks UMEM_TEST_HOOKS=1

# The kernel suite, inside a VM booting Debian's own kernel.
test-kernel: abi $(KMOD_HOOKS) $(KERNEL_SUITE_BINS)
	$(PY) -m compileall -q daemon tests
	$(VM) $(call vm-kernel-args,$(KMOD_HOOKS)) -- $(PY) -m pytest tests/kernel $(PYTEST_ARGS)

$(BUILD)/fault_bench: bench/fault_bench.c kernel/include/uapi/linux/umem.h | apt
	@mkdir -p $(BUILD)
	gcc -O2 -Wall -Wextra -Werror -Ikernel/include/uapi -o $@ $< -lpthread

# One VM boot: umem vs userfaultfd, the table for docs/performance.md.
bench-kernel: abi kmod $(BUILD)/fault_bench
	$(VM) $(VM_KERNEL_ARGS) -- sh -c "insmod $(CURDIR)/kernel/umem.ko && \
		$(PY) bench/kernel_bench.py --out $(CURDIR)/$(BUILD)/bench-kernel.json"

# One VM boot: umemd serve + pull side by side with raw TCP, ~8 min under TCG; the tables go
# into docs/performance.md (generated block), every run into build/bench-daemon.json.
bench-daemon: abi kmod
	$(PY) -m compileall -q daemon tests bench
	$(VM) --console-log $(BUILD)/vm-bench-daemon-console.log --udev \
		--env UMEM_KMOD=$(CURDIR)/kernel/umem.ko --env UMEM_IN_VM=1 --timeout 3600 -- \
		sh -c "insmod $(CURDIR)/kernel/umem.ko && udevadm settle && $(PY) -m bench.daemon_bench \
		--out $(CURDIR)/$(BUILD)/bench-daemon.json --doc $(CURDIR)/docs/performance.md $(BENCH_DAEMON_ARGS)"

# One VM boot: py-spy profiles of both daemons behind the bench-daemon table
# (build/profile-daemon-*.txt); py-spy comes with the venv (daemon/requirements.txt).
bench-daemon-profile: abi kmod
	$(VM) --console-log $(BUILD)/vm-bench-daemon-console.log --udev \
		--env UMEM_KMOD=$(CURDIR)/kernel/umem.ko --env UMEM_IN_VM=1 --timeout 1800 -- \
		sh -c "insmod $(CURDIR)/kernel/umem.ko && udevadm settle && $(PY) -m bench.daemon_bench profile"

# One VM boot: perf profiles behind the bench-kernel table (build/profile-*.txt).
bench-kernel-profile: kmod $(BUILD)/fault_bench
	$(VM) --console-log $(BUILD)/vm-profile-console.log -- sh bench/profile_kernel.sh
	@head -n 12 $(BUILD)/profile-*.txt


# The debug-kernel lanes (below) fit CI's 90 minutes from cold: about 25 more
# minutes (docs/testing.md). `make test EVIDENCE_LANES=` leaves them out. The
# newer-kernel lanes (kmod-newer, test-kernel-newest) stay out of `make test`:
# they pin packages of Debian unstable, whose archive moves on.
EVIDENCE_LANES ?= test-kernel-debug test-kernel-debug-canary

test: check test-kernel test-daemon $(if $(QEMU_TESTS),test-qemu test-e2e) $(EVIDENCE_LANES)
	@echo "make test: every lane passed"

# End to end: the source guest on the host, the destination (umem.ko, umemd
# pull, the patched QEMU) in the test VM, booted once for the whole suite.
test-e2e: abi kmod qemu qemu-guest
	$(PY) -m compileall -q daemon tests bench
	UMEM_CACHE=$(UMEM_CACHE) UMEM_QEMU=$(QEMU_BIN) $(PY) -m pytest tests/e2e $(PYTEST_ARGS)

# The chaos run (docs/reliability.md): CHAOS_RUNS (20) migrations of the e2e guest, each under
# faults drawn from CHAOS_SEED (printed; set it to replay, CHAOS_ONLY=N for one run), one VM
# boot; build/chaos/results.json and results.md. Its own lane, not in `make test`: it is long.
test-chaos: abi kmod qemu qemu-guest
	$(PY) -m compileall -q daemon tests bench
	UMEM_CACHE=$(UMEM_CACHE) UMEM_QEMU=$(QEMU_BIN) $(PY) -m pytest tests/chaos -s -o faulthandler_timeout=0 \
		$(PYTEST_ARGS)

demo-banner:
	@echo "make demo: a post-copy migration of a small guest into a VM, with umem."
	@echo "  The first run on a fresh machine sets everything up: Debian packages (~2 min),"
	@echo "  the patched QEMU (~5-10 min), the test guest (~1 min). Later runs take ~2 min."

demo: demo-banner setup qemu qemu-guest
	$(PY) -m compileall -q daemon tests bench
	UMEM_CACHE=$(UMEM_CACHE) UMEM_QEMU=$(QEMU_BIN) $(PY) -m tests.harness.demo

clean:
	$(MAKE) -C kernel clean
	rm -rf $(BUILD) daemon/umemd/_umem_abi.*

# The daemon suite (umemd serve/pull on the real device), inside the VM.
test-daemon: abi kmod
	$(PY) -m compileall -q daemon tests
	$(VM) $(VM_KERNEL_ARGS) --timeout 1500 --console-log $(BUILD)/vm-daemon-console.log -- \
		$(PY) -m pytest tests/daemon $(PYTEST_ARGS)

# Issue 12's evidence lanes (docs/testing.md), the last lanes of `make test`.
# Kernel builds run under nice -n 19, make -j2.
KBUILD_PACKAGES := flex bison bc libelf-dev libssl-dev xz-utils debootstrap
CHROOTS := $(CACHE)/chroots
# Pinned kernels: Debian 13's, and the newest Debian ships (unstable).
TRIXIE_KERNEL := 6.12.117+deb13-amd64
NEWEST_SUITE := sid
NEWEST_KERNEL := 7.2.13+deb14-amd64
NEWEST_ROOT := $(CACHE)/kernels/$(NEWEST_KERNEL)
DEBUG_ROOT = $(shell cat $(BUILD)/debug-kernel.root)
LANE_TIMEOUT ?= 1800
# $(call suite-in-vm,KERNEL_ROOT,UMEM_KO,CONSOLE_LOG[,VM_OPTIONS]): the kernel suite
# (stress test included, kmemleak scan at the end) in a VM booting that kernel.
suite-in-vm = $(VM) --kernel-root $(1) --console-log $(3) --udev --env UMEM_IN_VM=1 \
	--env UMEM_KMOD=$(CURDIR)/$(2) --timeout $(LANE_TIMEOUT) $(4) -- \
	sh tests/kbuild/suite-in-vm.sh $(CURDIR)/$(2) $(PYTEST_ARGS)

kbuild-apt:
	$(call apt-install,$(KBUILD_PACKAGES))

# Debian's linux-source of the tested kernel, built once per source version and config
# (tests/kbuild/debug-kernel.config) under $(CACHE)/debug-kernel.
debug-kernel: apt kbuild-apt
	@mkdir -p $(BUILD)
	tests/kbuild/debug-kernel.sh $(CACHE)/debug-kernel >$(BUILD)/debug-kernel.root.$$$$ && \
		mv $(BUILD)/debug-kernel.root.$$$$ $(BUILD)/debug-kernel.root
	@echo "debug kernel: $$(cat $(BUILD)/debug-kernel.root)"

test-kernel-debug: abi debug-kernel $(KERNEL_SUITE_BINS)
	tests/kbuild/kmod-tree.sh $(DEBUG_ROOT) $(BUILD)/kmod-debug UMEM_TEST_HOOKS=1
	$(PY) -m compileall -q daemon tests
	$(call suite-in-vm,$(DEBUG_ROOT),$(BUILD)/kmod-debug/umem.ko,$(BUILD)/vm-kernel-debug-console.log)

# The same lane with kernel/canary.c built in: it must fail, twice. A planted leak must
# show in the kmemleak scan (one boot, a short part of the suite), and a planted lock
# inversion and use-after-free must bring lockdep's and KASAN's reports (another boot).
CANARY_KO := $(BUILD)/kmod-debug-canary/umem.ko
CANARY_LOG := $(BUILD)/vm-kernel-debug-canary-console.log
CANARY_LEAK_OUT := $(BUILD)/kernel-debug-canary-leak.out
test-kernel-debug-canary: abi debug-kernel $(KERNEL_SUITE_BINS)
	tests/kbuild/kmod-tree.sh $(DEBUG_ROOT) $(BUILD)/kmod-debug-canary UMEM_CANARY=1 UMEM_TEST_HOOKS=1
	$(PY) -m compileall -q daemon tests
	@set -o pipefail; if $(call suite-in-vm,$(DEBUG_ROOT),$(CANARY_KO),$(BUILD)/vm-kernel-debug-canary-leak-console.log,\
		--env UMEM_CANARY_MODE=leak --env UMEM_SUITE=tests/kernel/test_lifecycle.py) | tee $(CANARY_LEAK_OUT); then \
		echo "canary: the debug lane PASSED with a planted leak: kmemleak cannot fail it" >&2; exit 1; fi
	@grep -E "kmemleak: [0-9]+ unreferenced object\(s\) after the suite, [1-9][0-9]* of them umem's" \
		$(CANARY_LEAK_OUT) || { echo "canary: no umem leak in kmemleak's report" >&2; exit 1; }
	@if $(call suite-in-vm,$(DEBUG_ROOT),$(CANARY_KO),$(CANARY_LOG)); then \
		echo "canary: the debug lane PASSED with the planted bugs: it cannot fail" >&2; exit 1; fi
	@grep -m1 'BUG: KASAN: use-after-free' $(CANARY_LOG) || \
		{ echo "canary: no KASAN use-after-free report in $(CANARY_LOG)" >&2; exit 1; }
	@grep -m1 'WARNING: possible circular locking dependency detected' $(CANARY_LOG) || \
		{ echo "canary: no lockdep report in $(CANARY_LOG)" >&2; exit 1; }
	@echo "canary: the debug lane failed on each planted bug, with kmemleak's, KASAN's and lockdep's reports: ok"

# Chroots of Debian 13 and unstable under $(CACHE)/chroots, for their compilers and headers.
chroots: kbuild-apt
	tests/kbuild/chroot.sh trixie $(CHROOTS)/trixie linux-headers-$(TRIXIE_KERNEL)
	tests/kbuild/chroot.sh $(NEWEST_SUITE) $(CHROOTS)/$(NEWEST_SUITE) linux-headers-$(NEWEST_KERNEL)

# W=1, warnings fail: Debian 12's 6.1 is `make kmod-strict`; here 6.12 and the newest.
kmod-newer: chroots
	@mkdir -p $(BUILD)
	tests/kbuild/kmod-chroot.sh $(CHROOTS)/trixie $(TRIXIE_KERNEL) $(BUILD)/kmod-trixie.log
	tests/kbuild/kmod-chroot.sh $(CHROOTS)/$(NEWEST_SUITE) $(NEWEST_KERNEL) $(BUILD)/kmod-$(NEWEST_SUITE).log
	tests/kbuild/kmod-chroot.sh $(CHROOTS)/$(NEWEST_SUITE) $(NEWEST_KERNEL) \
		$(BUILD)/kmod-$(NEWEST_SUITE)-hooks.log $(BUILD)/kmod-newest UMEM_TEST_HOOKS=1

test-kernel-newest: abi kmod-newer $(KERNEL_SUITE_BINS)
	tests/kbuild/debian-kernel.sh $(CHROOTS)/$(NEWEST_SUITE) $(NEWEST_KERNEL) $(NEWEST_ROOT)
	$(PY) -m compileall -q daemon tests
	$(call suite-in-vm,$(NEWEST_ROOT),$(BUILD)/kmod-newest/umem.ko,$(BUILD)/vm-kernel-newest-console.log)
