/* SPDX-License-Identifier: GPL-2.0 */
/*
 * umem internals shared by the control node (control.c), the instances and
 * their fault path (instance.c) and the server fd (server.c).
 */
#ifndef UMEM_INTERNAL_H
#define UMEM_INTERNAL_H

#include <linux/atomic.h>
#include <linux/cdev.h>
#include <linux/kref.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/spinlock.h>
#include <linux/types.h>
#include <linux/uidgid.h>
#include <linux/wait.h>
#include <linux/umem.h>

#include "compat.h"

struct mem_cgroup;

#if BITS_PER_LONG != 64
#error "umem exports its bitmaps as __u64 words and supports 64-bit kernels only"
#endif

/*
 * One umem instance: a shmem file whose pages become visible to mappings
 * only once a server has filled them.
 *
 * Lock order: umem_lock (control.c, the registry) -> inst->lock ->
 * inst->queue_lock. The fault path takes only queue_lock. inst->lock
 * covers @served and, on a server's release, the reset of the queue, so
 * a new server never sees the records of the old one dropped under it.
 *
 * Page state lives in three bitmaps, one bit per page:
 *   present   set once, after the page's contents are complete, never
 *             cleared; a page reaches a mapping (through the fault handler
 *             or its present-only fault-around) only while its bit is
 *             set. A page that is not present is a hole in the shmem file.
 *   filling   a bit lock held while one filler writes the page, so two
 *             fills of one page never race.
 *   requested set, under queue_lock, when a fault record for the page is
 *             queued for the current server; cleared, with the queue, when
 *             that server goes away, or when a fill of the page fails, so
 *             waiters request again.
 *
 * Lifetime: the registry (until UMEM_DESTROY), each open instance node,
 * the server file, each vma and each fault sleeping with mmap_lock dropped
 * hold a reference (kref). The last one frees the instance and puts @pin,
 * a file whose f_op->owner is this module: its deferred release drops the
 * module reference from core code, never from ours.
 *
 * Identity: the node's minor is never handed out again until every other
 * minor has been used since (control.c), so a stale node reference (an
 * O_PATH fd, a bind mount, a copy made with mknod) finds no instance
 * rather than a newer one. The node's owner, group and mode are fixed at
 * creation and reach devtmpfs and udev through the device type's
 * ->devnode(). Fill pages are charged to @memcg, fixed once: the cgroup
 * named at creation, or the first mapper's.
 */
struct umem_instance {
	struct kref kref;
	char name[UMEM_NAME_MAX];
	u8 tag[UMEM_TAG_SIZE];
	kuid_t uid;
	kgid_t gid;
	umode_t mode;
	u64 size;
	pgoff_t npages;
	struct file *shmem;
	struct file *pin;		/* pins the module (umem_instance_new()) */

	unsigned long *present;
	unsigned long *filling;
	unsigned long *requested;
	atomic64_t npresent;

	/* registry membership, protected by umem_lock */
	struct list_head node;
	int minor;
	struct cdev *cdev;
	struct device *dev;

	struct mutex lock;
	bool served;		/* a server fd is open; protected by lock */
	struct mem_cgroup *memcg;	/* set once (memcg.c); NULL: not yet known */

	bool dead;		/* destroyed: missing pages raise SIGBUS */
	unsigned int generation;	/* bumped when a server leaves */

	spinlock_t queue_lock;
	struct list_head queue;		/* struct umem_request, oldest first */
	struct list_head fillers;	/* struct umem_filler: UMEM_FILLs running */
	wait_queue_head_t server_wq;	/* readers and pollers of the server fd */
	wait_queue_head_t fault_wq;	/* tasks waiting for a page */

	atomic64_t stat_requested;
	atomic64_t stat_faults;
	atomic64_t stat_waiters;
	atomic64_t stat_wait_ns;
	atomic64_t stat_filled;
	atomic64_t stat_zeroed;
	atomic64_t stat_skipped;
};

/* A queued fault record. */
struct umem_request {
	struct list_head node;
	pgoff_t pgoff;
	u32 flags;
};

/* A task in UMEM_FILL, on inst->fillers (queue_lock). */
struct umem_filler {
	struct list_head node;
	struct task_struct *task;
};

/* instance.c */
int umem_instance_init(void);
void umem_instance_exit(void);
struct umem_instance *umem_instance_new(const char *name, u64 size);
void umem_read_stats(struct umem_instance *inst, struct umem_stats *stats);
void umem_get(struct umem_instance *inst);
void umem_put(struct umem_instance *inst);
bool umem_page_present(struct umem_instance *inst, pgoff_t pgoff);
void umem_mark_dead(struct umem_instance *inst);
void umem_reset_requests(struct umem_instance *inst);
void umem_forget_request(struct umem_instance *inst, pgoff_t pgoff);
void umem_free_requests(struct list_head *list);
void umem_fill_begin(struct umem_instance *inst, struct umem_filler *filler);
void umem_fill_end(struct umem_instance *inst, struct umem_filler *filler);
extern const struct file_operations umem_node_fops;

/* control.c */
struct umem_instance *umem_find_minor(int minor);

/* memcg.c */
void umem_memcg_init(void);
void umem_memcg_exit(void);
struct mem_cgroup *umem_memcg_from_fd(int fd);
void umem_memcg_set(struct umem_instance *inst, struct mem_cgroup *memcg);
void umem_memcg_adopt_mapper(struct umem_instance *inst);
void umem_memcg_put(struct umem_instance *inst);
struct mem_cgroup *umem_charge_begin(struct umem_instance *inst);
void umem_charge_end(struct mem_cgroup *old);

/* sysfs.c */
extern const struct attribute_group *umem_instance_groups[];

/* server.c */
struct file *umem_server_open(struct umem_instance *inst, u64 flags);

#endif /* UMEM_INTERNAL_H */
