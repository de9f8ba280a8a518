// SPDX-License-Identifier: GPL-2.0
/*
 * The kernel suite's park points (testhooks.h), built with
 * UMEM_TEST_HOOKS=1 only.  One module parameter drives them:
 *
 *   echo freed >/sys/module/umem/parameters/park    arm a point
 *   cat /sys/module/umem/parameters/park             "armed=freed parked=none"
 *   echo go >/sys/module/umem/parameters/park        let the parked task on
 *
 * An armed point parks the first task that reaches it, once; another point
 * may be armed while a task is parked.  A parked task sleeps killably, so
 * a test that dies does not leave it stuck.
 */
#include <linux/kernel.h>
#include <linux/moduleparam.h>
#include <linux/sched/signal.h>
#include <linux/spinlock.h>
#include <linux/string.h>
#include <linux/sysfs.h>
#include <linux/wait.h>

#include "testhooks.h"

static const char * const umem_park_names[UMEM_PARK_POINTS] = {
	[UMEM_PARK_NONE]		= "none",
	[UMEM_PARK_SERVER_RELEASE]	= "server_release",
	[UMEM_PARK_FAULT_WOKEN]		= "fault_woken",
	[UMEM_PARK_FREED]		= "freed",
};

static DEFINE_SPINLOCK(umem_park_lock);
static DECLARE_WAIT_QUEUE_HEAD(umem_park_wq);
static enum umem_park_point umem_park_armed;	/* under umem_park_lock */
static enum umem_park_point umem_park_parked;	/* under umem_park_lock */
static unsigned long umem_park_released;	/* written under umem_park_lock */

void umem_test_park(enum umem_park_point point)
{
	unsigned long ticket;

	spin_lock(&umem_park_lock);
	if (umem_park_armed != point || umem_park_parked != UMEM_PARK_NONE) {
		spin_unlock(&umem_park_lock);
		return;
	}
	umem_park_armed = UMEM_PARK_NONE;
	umem_park_parked = point;
	ticket = umem_park_released;
	spin_unlock(&umem_park_lock);

	pr_info("umem: test hook: parked at %s\n", umem_park_names[point]);
	wait_event_killable(umem_park_wq, READ_ONCE(umem_park_released) != ticket);

	spin_lock(&umem_park_lock);
	umem_park_parked = UMEM_PARK_NONE;
	spin_unlock(&umem_park_lock);
}

static int umem_park_set(const char *val, const struct kernel_param *kp)
{
	int point;

	if (sysfs_streq(val, "go")) {
		spin_lock(&umem_park_lock);
		WRITE_ONCE(umem_park_released, umem_park_released + 1);
		spin_unlock(&umem_park_lock);
		wake_up_all(&umem_park_wq);
		return 0;
	}
	point = sysfs_match_string(umem_park_names, val);
	if (point < 0)
		return point;
	spin_lock(&umem_park_lock);
	umem_park_armed = point;
	spin_unlock(&umem_park_lock);
	return 0;
}

static int umem_park_get(char *buf, const struct kernel_param *kp)
{
	enum umem_park_point armed, parked;

	spin_lock(&umem_park_lock);
	armed = umem_park_armed;
	parked = umem_park_parked;
	spin_unlock(&umem_park_lock);
	return sysfs_emit(buf, "armed=%s parked=%s\n",
			  umem_park_names[armed], umem_park_names[parked]);
}

static const struct kernel_param_ops umem_park_ops = {
	.set = umem_park_set,
	.get = umem_park_get,
};

module_param_cb(park, &umem_park_ops, NULL, 0600);
MODULE_PARM_DESC(park, "kernel suite only: arm a park point, go to release the parked task");
