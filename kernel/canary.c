// SPDX-License-Identifier: GPL-2.0
/*
 * The debug lane's canary: two planted bugs that KASAN and lockdep must
 * report, so that `make test-kernel-debug-canary` proves the lane can fail.
 *
 * Built only with UMEM_CANARY=1 (kernel/Kbuild), never in a normal build.
 * Writing 1 to /sys/module/umem/parameters/canary (the debug lane's script
 * does, when the parameter exists) first takes two mutexes in both orders,
 * an AB-BA inversion lockdep reports as a possible circular locking
 * dependency (no deadlock: one thread, one order after the other), then
 * reads a freed allocation, a use-after-free KASAN reports.  Lockdep goes
 * first: KASAN's report panics the VM (panic_on_warn).  Writing "leak"
 * instead drops the only pointer to an allocation, a leak the lane's
 * kmemleak scan must attribute to umem.
 */
#include <linux/compiler.h>
#include <linux/moduleparam.h>
#include <linux/mutex.h>
#include <linux/printk.h>
#include <linux/slab.h>
#include <linux/string.h>

static DEFINE_MUTEX(umem_canary_a);
static DEFINE_MUTEX(umem_canary_b);

static void umem_canary_lock_inversion(void)
{
	mutex_lock(&umem_canary_a);
	mutex_lock(&umem_canary_b);
	mutex_unlock(&umem_canary_b);
	mutex_unlock(&umem_canary_a);

	mutex_lock(&umem_canary_b);
	mutex_lock(&umem_canary_a);
	mutex_unlock(&umem_canary_a);
	mutex_unlock(&umem_canary_b);
}

static int umem_canary_use_after_free(void)
{
	int *p = kmalloc(sizeof(*p) * 16, GFP_KERNEL);
	int v;

	if (!p)
		return -ENOMEM;
	p[3] = 42;
	kfree(p);
	OPTIMIZER_HIDE_VAR(p);
	v = READ_ONCE(p[3]);
	return v == 42 ? 0 : 1;
}

static int umem_canary_leak(void)
{
	void *p = kmalloc(200, GFP_KERNEL);

	if (!p)
		return -ENOMEM;
	memset(p, 0x5a, 200);
	OPTIMIZER_HIDE_VAR(p);
	return 0;
}

static int umem_canary_set(const char *val, const struct kernel_param *kp)
{
	bool fire;
	int ret;

	if (sysfs_streq(val, "leak")) {
		pr_warn("umem: canary: leaking an allocation\n");
		return umem_canary_leak();
	}
	ret = kstrtobool(val, &fire);
	if (ret || !fire)
		return ret;
	pr_warn("umem: canary: planting an AB-BA lock inversion and a use-after-free\n");
	umem_canary_lock_inversion();
	return umem_canary_use_after_free() < 0 ? -ENOMEM : 0;
}

static const struct kernel_param_ops umem_canary_ops = {
	.set = umem_canary_set,
};

module_param_cb(canary, &umem_canary_ops, NULL, 0200);
MODULE_PARM_DESC(canary, "debug lane canary: 1 plants a lock inversion and a use-after-free, leak a leak");
