// SPDX-License-Identifier: GPL-2.0
/*
 * umem instances: the shmem backing, the instance node QEMU maps
 * (/dev/umem/<name>) and the fault path that blocks on missing pages.
 *
 * The mapping is a real shmem mapping: ->mmap swaps in the instance's
 * shmem file (vma_set_file), so rmap, GUP and truncation see ordinary
 * refcounted shmem pages. Only ->fault is ours: it lets a page through to
 * shmem's fault handler once the page is present, and otherwise queues a
 * fault record for the server and sleeps until the page is filled.
 * shmem's fault-around (->map_pages) is not inherited as it is: it would
 * map pages straight from the page cache, including one a filler is still
 * writing. Ours hands it only runs of present pages.
 */
#include <linux/anon_inodes.h>
#include <linux/fs.h>
#include <linux/fs_context.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mount.h>
#include <linux/poll.h>
#include <linux/sched/clock.h>
#include <linux/sched/signal.h>
#include <linux/shmem_fs.h>
#include <linux/slab.h>

#include "testhooks.h"
#include "umem.h"

/* Private tmpfs with huge=never: a huge page would map 511 missing pages. */
static struct vfsmount *umem_mnt;

/* shmem's vm_ops with our fault handler; built at the first mmap. */
static DEFINE_MUTEX(umem_vm_ops_lock);
static struct vm_operations_struct umem_vm_ops;
static vm_fault_t (*umem_shmem_fault)(struct vm_fault *vmf);
static vm_fault_t (*umem_shmem_map_pages)(struct vm_fault *vmf,
					  pgoff_t start, pgoff_t end);

int umem_instance_init(void)
{
	struct file_system_type *tmpfs = get_fs_type("tmpfs");
	char options[] = "huge=never";	/* parsed in place: not const */

	if (!tmpfs)
		return -ENODEV;
	umem_mnt = vfs_kern_mount(tmpfs, SB_KERNMOUNT, tmpfs->name, options);
	module_put(tmpfs->owner);	/* put_filesystem() is not exported */
	return PTR_ERR_OR_ZERO(umem_mnt);
}

void umem_instance_exit(void)
{
	kern_unmount(umem_mnt);
}

/* The file that pins the module for an instance: its f_op->owner is us. */
static const struct file_operations umem_pin_fops = {
	.owner		= THIS_MODULE,
};

struct umem_instance *umem_instance_new(const char *name, u64 size)
{
	struct umem_instance *inst;
	pgoff_t npages = size >> PAGE_SHIFT;
	char shmem_name[UMEM_NAME_MAX + 8];
	long err = -ENOMEM;

	inst = kzalloc(sizeof(*inst), GFP_KERNEL);
	if (!inst)
		return ERR_PTR(-ENOMEM);
	kref_init(&inst->kref);
	strscpy(inst->name, name, sizeof(inst->name));
	inst->size = size;
	inst->npages = npages;
	inst->minor = -1;
	INIT_LIST_HEAD(&inst->node);
	mutex_init(&inst->lock);
	spin_lock_init(&inst->queue_lock);
	INIT_LIST_HEAD(&inst->queue);
	INIT_LIST_HEAD(&inst->fillers);
	init_waitqueue_head(&inst->server_wq);
	init_waitqueue_head(&inst->fault_wq);

	snprintf(shmem_name, sizeof(shmem_name), "umem:%s", name);
	/*
	 * Commit the whole size now (no VM_NORESERVE): a destination that
	 * cannot hold the guest fails at CREATE, not half way through a
	 * migration, and fills skip per-page accounting. First, so that a
	 * CREATE refused for its size allocates no bitmaps (3 bits a page).
	 */
	inst->shmem = umem_shmem_file_setup(umem_mnt, shmem_name, size, 0);
	if (IS_ERR(inst->shmem)) {
		err = PTR_ERR(inst->shmem);
		inst->shmem = NULL;
		goto fail;
	}

	inst->present = kvcalloc(BITS_TO_LONGS(npages), sizeof(long), GFP_KERNEL);
	inst->filling = kvcalloc(BITS_TO_LONGS(npages), sizeof(long), GFP_KERNEL);
	inst->requested = kvcalloc(BITS_TO_LONGS(npages), sizeof(long), GFP_KERNEL);
	if (!inst->present || !inst->filling || !inst->requested)
		goto fail;

	/*
	 * Pin the module with a file of ours rather than __module_get(): the
	 * last reference is often dropped from our own code (munmap, a fault
	 * that slept), and a module_put() there could let rmmod unload the
	 * code we return through. fput() defers the final release, and its
	 * module_put(), to task work or a kworker, in core code.
	 */
	inst->pin = anon_inode_getfile("[umem-instance]", &umem_pin_fops, NULL, O_RDONLY);
	if (IS_ERR(inst->pin)) {
		err = PTR_ERR(inst->pin);
		inst->pin = NULL;
		goto fail;
	}
	return inst;

fail:
	umem_put(inst);
	return ERR_PTR(err);
}

void umem_get(struct umem_instance *inst)
{
	kref_get(&inst->kref);
}

/* Free queued fault records; @list is private to the caller. */
void umem_free_requests(struct list_head *list)
{
	struct umem_request *req, *tmp;

	list_for_each_entry_safe(req, tmp, list, node)
		kfree(req);
}

static void umem_instance_free(struct kref *kref)
{
	struct umem_instance *inst = container_of(kref, struct umem_instance, kref);
	struct file *pin = inst->pin;

	umem_free_requests(&inst->queue);
	umem_memcg_put(inst);
	if (inst->shmem)
		fput(inst->shmem);
	kvfree(inst->present);
	kvfree(inst->filling);
	kvfree(inst->requested);
	kfree(inst);
	if (pin)
		fput(pin);	/* deferred: the module goes only after we return */
	umem_test_park(UMEM_PARK_FREED);
}

void umem_put(struct umem_instance *inst)
{
	kref_put(&inst->kref, umem_instance_free);
}

void umem_read_stats(struct umem_instance *inst, struct umem_stats *stats)
{
	memset(stats, 0, sizeof(*stats));
	stats->size = inst->size;
	stats->pages = inst->npages;
	stats->present = atomic64_read(&inst->npresent);
	stats->requested = atomic64_read(&inst->stat_requested);
	stats->faults = atomic64_read(&inst->stat_faults);
	stats->waiters = atomic64_read(&inst->stat_waiters);
	stats->wait_ns = atomic64_read(&inst->stat_wait_ns);
	stats->filled = atomic64_read(&inst->stat_filled);
	stats->zeroed = atomic64_read(&inst->stat_zeroed);
	stats->skipped = atomic64_read(&inst->stat_skipped);
}

bool umem_page_present(struct umem_instance *inst, pgoff_t pgoff)
{
	bool present = test_bit(pgoff, inst->present);

	/* Pairs with the barrier before set_bit() in the fill path. */
	smp_rmb();
	return present;
}

/*
 * Destroyed: waiters and later faults on missing pages get SIGBUS, readers
 * of the server fd see end of file.
 */
void umem_mark_dead(struct umem_instance *inst)
{
	WRITE_ONCE(inst->dead, true);
	wake_up_all(&inst->fault_wq);
	wake_up_all(&inst->server_wq);
}

/*
 * The server went away: forget what it was asked, so every waiter asks the
 * next server again. Waiters notice the new generation and retry. Caller
 * holds inst->lock and has not yet cleared inst->served, so no new server
 * can attach and read the records being dropped.
 */
void umem_reset_requests(struct umem_instance *inst)
{
	LIST_HEAD(dropped);

	lockdep_assert_held(&inst->lock);
	spin_lock(&inst->queue_lock);
	list_splice_init(&inst->queue, &dropped);
	bitmap_zero(inst->requested, inst->npages);
	WRITE_ONCE(inst->generation, inst->generation + 1);
	spin_unlock(&inst->queue_lock);

	umem_free_requests(&dropped);
	wake_up_all(&inst->fault_wq);
}

/* Forget that @pgoff was asked for: its waiters wake and ask again. */
void umem_forget_request(struct umem_instance *inst, pgoff_t pgoff)
{
	spin_lock(&inst->queue_lock);
	__clear_bit(pgoff, inst->requested);
	WRITE_ONCE(inst->generation, inst->generation + 1);
	spin_unlock(&inst->queue_lock);
	wake_up_all(&inst->fault_wq);
}

/*
 * A UMEM_FILL in progress: the calling task is on inst->fillers, under
 * queue_lock, until the call ends. A fault of that task on a missing page
 * of the same instance (a source inside the instance's own mapping) gets
 * SIGBUS, so the copy fails with EFAULT: it would wait for a page only
 * that task can fill.
 */
void umem_fill_begin(struct umem_instance *inst, struct umem_filler *filler)
{
	filler->task = current;
	spin_lock(&inst->queue_lock);
	list_add(&filler->node, &inst->fillers);
	spin_unlock(&inst->queue_lock);
}

void umem_fill_end(struct umem_instance *inst, struct umem_filler *filler)
{
	spin_lock(&inst->queue_lock);
	list_del(&filler->node);
	spin_unlock(&inst->queue_lock);
}

/* Whether the current task is in a UMEM_FILL of @inst. */
static bool umem_current_fills(struct umem_instance *inst)
{
	struct umem_filler *filler;
	bool found = false;

	/* Only current adds itself: an entry of ours is never missed here. */
	if (list_empty_careful(&inst->fillers))
		return false;
	spin_lock(&inst->queue_lock);
	list_for_each_entry(filler, &inst->fillers, node) {
		if (filler->task == current) {
			found = true;
			break;
		}
	}
	spin_unlock(&inst->queue_lock);
	return found;
}

/* Queue one fault record for @pgoff unless the current server has one. */
static int umem_request_page(struct umem_instance *inst, pgoff_t pgoff,
			     u32 flags)
{
	struct umem_request *req;

	if (test_bit(pgoff, inst->requested))
		return 0;
	/* Charged to the faulting task: a mapper pays for what it queues. */
	req = kmalloc(sizeof(*req), GFP_KERNEL_ACCOUNT);
	if (!req)
		return -ENOMEM;
	req->pgoff = pgoff;
	req->flags = flags;

	spin_lock(&inst->queue_lock);
	if (test_bit(pgoff, inst->requested)) {
		spin_unlock(&inst->queue_lock);
		kfree(req);
		return 0;
	}
	__set_bit(pgoff, inst->requested);
	list_add_tail(&req->node, &inst->queue);
	spin_unlock(&inst->queue_lock);

	atomic64_inc(&inst->stat_requested);
	wake_up_poll(&inst->server_wq, EPOLLIN | EPOLLRDNORM);
	return 0;
}

static bool umem_wait_over(struct umem_instance *inst, pgoff_t pgoff,
			   unsigned int generation)
{
	return umem_page_present(inst, pgoff) || READ_ONCE(inst->dead) ||
	       READ_ONCE(inst->generation) != generation;
}

/*
 * Sleep until the page is present, the instance dies or the server changes.
 * Returns 0 or -ERESTARTSYS when a signal ended the wait.
 */
static int umem_wait_page(struct umem_instance *inst, pgoff_t pgoff,
			  unsigned int generation, bool interruptible)
{
	u64 start = local_clock();	/* cheap: no clocksource read */
	int ret;

	atomic64_inc(&inst->stat_faults);
	atomic64_inc(&inst->stat_waiters);
	if (interruptible)
		ret = wait_event_interruptible(inst->fault_wq,
				umem_wait_over(inst, pgoff, generation));
	else
		ret = wait_event_killable(inst->fault_wq,
				umem_wait_over(inst, pgoff, generation));
	atomic64_dec(&inst->stat_waiters);
	/* local_clock() may step back across CPUs: never add a wrapped value */
	atomic64_add(max_t(s64, local_clock() - start, 0), &inst->stat_wait_ns);
	return ret;
}

/*
 * Whether a wait for a page may end on any signal. Only for a user-mode
 * fault: it returns to user space, where the signal is delivered. A
 * kernel-mode fault (copy_from_user() in write(2), GUP, KVM writing guest
 * memory) that returns VM_FAULT_RETRY with a non-fatal signal pending is
 * retried at once, and would spin for as long as the page is missing, the
 * signal never delivered: it sleeps killably (as handle_userfault() does
 * since "userfaultfd: prevent busy looping for tasks with signals pending").
 */
static bool umem_fault_interruptible(const struct vm_fault *vmf)
{
	return (vmf->flags & FAULT_FLAG_INTERRUPTIBLE) &&
	       (vmf->flags & FAULT_FLAG_USER);
}

/*
 * A missing page. Without FAULT_FLAG_ALLOW_RETRY (e.g. /proc/pid/mem) we
 * must sleep holding mmap_lock. With it, we drop the lock while we sleep
 * and return VM_FAULT_RETRY, as handle_userfault() does; with
 * FAULT_FLAG_RETRY_NOWAIT (KVM's async page faults) we only queue the
 * request and return VM_FAULT_RETRY still holding the lock.
 *
 * No request and no wait, but SIGBUS: for a task dumping core or exiting
 * (a core dump would fetch the rest of the instance page by page, or hang
 * with no server; a missing page is a hole in the core), as in
 * handle_userfault(), and for a task filling this instance from its own
 * mapping (umem_current_fills()).
 */
static vm_fault_t umem_fault_missing(struct umem_instance *inst,
				     struct vm_fault *vmf)
{
	u32 flags = (vmf->flags & FAULT_FLAG_WRITE) ? UMEM_FAULT_FLAG_WRITE : 0;
	pgoff_t pgoff = vmf->pgoff;
	unsigned int generation;

	if (current->flags & (PF_DUMPCORE | PF_EXITING))
		return VM_FAULT_SIGBUS;
	if (umem_current_fills(inst))
		return VM_FAULT_SIGBUS;
	for (;;) {
		if (READ_ONCE(inst->dead))
			return VM_FAULT_SIGBUS;
		generation = READ_ONCE(inst->generation);
		if (umem_request_page(inst, pgoff, flags))
			return VM_FAULT_OOM;
		if (vmf->flags & FAULT_FLAG_RETRY_NOWAIT)
			return VM_FAULT_RETRY;
		if (vmf->flags & FAULT_FLAG_ALLOW_RETRY)
			break;
		if (umem_wait_page(inst, pgoff, generation, false))
			return VM_FAULT_SIGBUS;	/* killed */
		if (umem_page_present(inst, pgoff))
			return umem_shmem_fault(vmf);
	}

	umem_get(inst);
	umem_release_fault_lock(vmf);
	umem_wait_page(inst, pgoff, generation, umem_fault_interruptible(vmf));
	umem_test_park(UMEM_PARK_FAULT_WOKEN);
	umem_put(inst);
	return VM_FAULT_RETRY;
}

static vm_fault_t umem_fault(struct vm_fault *vmf)
{
	struct umem_instance *inst = vmf->vma->vm_private_data;

	if (vmf->pgoff >= inst->npages)
		return VM_FAULT_SIGBUS;
	if (umem_page_present(inst, vmf->pgoff))
		return umem_shmem_fault(vmf);
	return umem_fault_missing(inst, vmf);
}

/*
 * Fault-around over present pages only, forward from the faulting page:
 * each run of present pages in [vmf->pgoff, end] goes to shmem's
 * map_pages; missing pages are left for ->fault. A retried fault usually
 * ends here, mapping the page it waited for and the present pages after
 * it at once. (Pages before it are most often mapped already: scanning
 * them again costs more than it maps.)
 */
static vm_fault_t umem_map_pages(struct vm_fault *vmf, pgoff_t start,
				 pgoff_t end)
{
	struct umem_instance *inst = vmf->vma->vm_private_data;
	vm_fault_t ret = 0;
	pgoff_t run_end;

	start = max(start, vmf->pgoff);
	if (end >= inst->npages)
		end = inst->npages - 1;
	while (start <= end) {
		start = find_next_bit(inst->present, end + 1, start);
		if (start > end)
			break;
		run_end = find_next_zero_bit(inst->present, end + 1, start);
		smp_rmb();	/* present bits before the pages' contents */
		ret |= umem_shmem_map_pages(vmf, start, run_end - 1);
		start = run_end;
	}
	return ret;
}

static void umem_vm_open(struct vm_area_struct *vma)
{
	umem_get(vma->vm_private_data);
}

static void umem_vm_close(struct vm_area_struct *vma)
{
	umem_put(vma->vm_private_data);
}

/* Caller: just ran shmem's ->mmap on @vma, which set shmem's vm_ops. */
static void umem_vm_ops_setup(const struct vm_operations_struct *shmem_ops)
{
	mutex_lock(&umem_vm_ops_lock);
	if (!umem_shmem_fault) {
		umem_vm_ops = *shmem_ops;
		umem_vm_ops.open = umem_vm_open;
		umem_vm_ops.close = umem_vm_close;
		umem_vm_ops.fault = umem_fault;
		umem_shmem_map_pages = shmem_ops->map_pages;
		umem_vm_ops.map_pages = umem_shmem_map_pages ? umem_map_pages : NULL;
		umem_shmem_fault = shmem_ops->fault;
	}
	mutex_unlock(&umem_vm_ops_lock);
}

static int umem_node_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct umem_instance *inst = file->private_data;
	unsigned long pages = vma_pages(vma);
	int ret;

	if (!(vma->vm_flags & VM_MAYSHARE))	/* MAP_PRIVATE */
		return -EINVAL;
	if (vma->vm_pgoff >= inst->npages || pages > inst->npages - vma->vm_pgoff)
		return -ENXIO;
	if (READ_ONCE(inst->dead))
		return -ENODEV;

	/*
	 * VM_DONTEXPAND (one of VM_SPECIAL) makes the vma ineligible for
	 * huge pages, khugepaged and MADV_COLLAPSE alike: a collapse would
	 * fill every missing page with zeros under one PMD. It also stops
	 * mremap() from growing the vma and mlock() from locking (and so
	 * populating) it; see docs/kernel-abi.md.
	 */
	umem_vma_set_flags(vma, VM_DONTEXPAND);
	vma_set_file(vma, inst->shmem);
	ret = umem_file_mmap(inst->shmem, vma);
	if (ret)
		return ret;
	umem_memcg_adopt_mapper(inst);
	umem_vm_ops_setup(vma->vm_ops);
	umem_get(inst);
	vma->vm_private_data = inst;
	vma->vm_ops = &umem_vm_ops;
	return 0;
}

static int umem_node_open(struct inode *inode, struct file *file)
{
	struct umem_instance *inst = umem_find_minor(iminor(inode));

	if (!inst)
		return -ENODEV;
	file->private_data = inst;
	return 0;
}

static int umem_node_release(struct inode *inode, struct file *file)
{
	umem_put(file->private_data);
	return 0;
}

static loff_t umem_node_llseek(struct file *file, loff_t offset, int whence)
{
	struct umem_instance *inst = file->private_data;

	return fixed_size_llseek(file, offset, whence, inst->size);
}

const struct file_operations umem_node_fops = {
	.owner		= THIS_MODULE,
	.open		= umem_node_open,
	.release	= umem_node_release,
	.llseek		= umem_node_llseek,
	.mmap		= umem_node_mmap,
};
