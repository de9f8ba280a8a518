// SPDX-License-Identifier: GPL-2.0
/*
 * A minimal KVM guest whose memory slot is a umem mapping: the path QEMU/KVM
 * takes (KVM's GUP of guest memory, FAULT_FLAG_RETRY_NOWAIT first).
 *
 *   kvm_guest NODE SIZE
 *
 * Maps NODE (a /dev/umem/<name> instance of SIZE bytes) as guest-physical
 * 0, runs the real-mode code the server put in page 0, prints one line
 * "out 0xNN" per byte the guest writes to port 0x10 and "hlt" when it
 * halts. Exit 0 after hlt, 1 on any other exit, 2 on a setup error.
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

static int fail(const char *what)
{
	perror(what);
	return 2;
}

int main(int argc, char **argv)
{
	struct kvm_userspace_memory_region region = { 0 };
	struct kvm_sregs sregs;
	struct kvm_regs regs = { 0 };
	struct kvm_run *run;
	int kvm, vm, vcpu, node, run_size;
	size_t size;
	void *mem;

	if (argc != 3) {
		fprintf(stderr, "usage: %s NODE SIZE\n", argv[0]);
		return 2;
	}
	size = strtoull(argv[2], NULL, 0);
	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		return fail("/dev/kvm");
	vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		return fail("KVM_CREATE_VM");
	node = open(argv[1], O_RDWR | O_CLOEXEC);
	if (node < 0)
		return fail(argv[1]);
	mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, node, 0);
	if (mem == MAP_FAILED)
		return fail("mmap");

	region.slot = 0;
	region.guest_phys_addr = 0;
	region.memory_size = size;
	region.userspace_addr = (unsigned long)mem;
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		return fail("KVM_SET_USER_MEMORY_REGION");

	vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		return fail("KVM_CREATE_VCPU");
	run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		return fail("mmap kvm_run");

	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		return fail("KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	sregs.ds.base = 0;
	sregs.ds.selector = 0;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		return fail("KVM_SET_SREGS");
	regs.rip = 0;
	regs.rflags = 2;
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		return fail("KVM_SET_REGS");

	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0)
			return fail("KVM_RUN");
		switch (run->exit_reason) {
		case KVM_EXIT_IO:
			if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == 0x10) {
				printf("out 0x%02x\n", *((unsigned char *)run + run->io.data_offset));
				fflush(stdout);
				break;
			}
			printf("unexpected io port 0x%x\n", run->io.port);
			return 1;
		case KVM_EXIT_HLT:
			printf("hlt\n");
			return 0;
		default:
			printf("unexpected exit reason %u\n", run->exit_reason);
			return 1;
		}
	}
}
