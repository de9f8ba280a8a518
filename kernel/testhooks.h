/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Park points for the kernel suite: places where a test holds one task
 * still, to make a race window as wide as it likes.  Built only with
 * UMEM_TEST_HOOKS=1 (kernel/Kbuild; the kernel suite's lanes build so);
 * otherwise umem_test_park() is an empty inline and costs nothing.
 */
#ifndef UMEM_TESTHOOKS_H
#define UMEM_TESTHOOKS_H

enum umem_park_point {
	UMEM_PARK_NONE,
	/* umem_server_release(): served is clear, the release not done */
	UMEM_PARK_SERVER_RELEASE,
	/* a fault that slept: woken, still holding its instance reference */
	UMEM_PARK_FAULT_WOKEN,
	/* umem_instance_free(): the instance is gone, its code still running */
	UMEM_PARK_FREED,
	UMEM_PARK_POINTS
};

#ifdef UMEM_TEST_HOOKS
void umem_test_park(enum umem_park_point point);
#else
static inline void umem_test_park(enum umem_park_point point) { }
#endif

#endif /* UMEM_TESTHOOKS_H */
