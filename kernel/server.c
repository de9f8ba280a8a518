// SPDX-License-Identifier: GPL-2.0
/*
 * The server fd: the daemon's side of one instance. It reads fault records,
 * polls for them, and makes pages present with UMEM_FILL and UMEM_ZERO.
 * A present page is never written again: a late fill of a page the guest
 * has already written is counted as skipped.
 */
#include <linux/anon_inodes.h>
#include <linux/fs.h>
#include <linux/highmem.h>
#include <linux/mm.h>
#include <linux/pagemap.h>
#include <linux/poll.h>
#include <linux/sched/signal.h>
#include <linux/shmem_fs.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "testhooks.h"
#include "umem.h"

/* Fault records copied out per read() pass (on the stack: 512 bytes). */
#define UMEM_READ_BATCH 16

static bool umem_server_readable(struct umem_instance *inst)
{
	return !list_empty_careful(&inst->queue) || READ_ONCE(inst->dead);
}

/*
 * Move up to @max records off the queue onto @taken, dropping those whose
 * page is present already, and describe them in @out.
 */
static unsigned int umem_dequeue(struct umem_instance *inst, struct list_head *taken,
				 struct umem_fault *out, unsigned int max)
{
	struct umem_request *req, *tmp;
	unsigned int n = 0;
	LIST_HEAD(stale);

	spin_lock(&inst->queue_lock);
	list_for_each_entry_safe(req, tmp, &inst->queue, node) {
		if (n == max)
			break;
		if (umem_page_present(inst, req->pgoff)) {
			list_move(&req->node, &stale);
			continue;
		}
		list_move_tail(&req->node, taken);
		memset(&out[n], 0, sizeof(out[n]));
		out[n].event = UMEM_EVENT_FAULT;
		out[n].flags = req->flags;
		out[n].offset = (u64)req->pgoff << PAGE_SHIFT;
		n++;
	}
	spin_unlock(&inst->queue_lock);

	umem_free_requests(&stale);
	return n;
}

/*
 * Fault records, oldest first. Blocks until there is one unless the fd is
 * non-blocking; 0 (end of file) once the instance is destroyed.
 */
static ssize_t umem_server_read(struct file *file, char __user *buf,
				size_t count, loff_t *ppos)
{
	struct umem_instance *inst = file->private_data;
	struct umem_fault msgs[UMEM_READ_BATCH];
	size_t max = count / sizeof(msgs[0]);
	unsigned int n;
	LIST_HEAD(taken);
	ssize_t ret;

	if (!max)
		return -EINVAL;
	for (;;) {
		if (READ_ONCE(inst->dead))
			return 0;
		n = umem_dequeue(inst, &taken, msgs, min_t(size_t, max, UMEM_READ_BATCH));
		if (n)
			break;
		if (file->f_flags & O_NONBLOCK)
			return -EAGAIN;
		ret = wait_event_interruptible(inst->server_wq,
					       umem_server_readable(inst));
		if (ret)
			return ret;
	}

	ret = n * sizeof(msgs[0]);
	if (copy_to_user(buf, msgs, ret)) {
		/* Not delivered: back to the head of the queue, in order. */
		spin_lock(&inst->queue_lock);
		list_splice(&taken, &inst->queue);
		spin_unlock(&inst->queue_lock);
		return -EFAULT;
	}
	umem_free_requests(&taken);
	return ret;
}

static __poll_t umem_server_poll(struct file *file, poll_table *wait)
{
	struct umem_instance *inst = file->private_data;
	__poll_t mask = 0;

	poll_wait(file, &inst->server_wq, wait);
	if (!list_empty_careful(&inst->queue))
		mask |= EPOLLIN | EPOLLRDNORM;
	if (READ_ONCE(inst->dead))
		mask |= EPOLLHUP;
	return mask;
}

/*
 * Copy one page from @src into @page with page faults disabled (the caller
 * faulted @src in first); returns the bytes not copied: the source went
 * away again in between, and the caller tries again.
 */
static unsigned long umem_copy_nofault(struct page *page,
				       const void __user *src)
{
	unsigned long left;
	void *dst = kmap_local_page(page);

	pagefault_disable();
	left = __copy_from_user_inatomic(dst, src, PAGE_SIZE);
	pagefault_enable();
	kunmap_local(dst);
	flush_dcache_page(page);
	return left;
}

#ifdef UMEM_HAVE_PAGE_WRITE_BEGIN
/*
 * Copy one page in through shmem's own write path: write_begin allocates
 * the page without zeroing it (a fresh page would otherwise be cleared
 * only to be overwritten at once), write_end marks it uptodate and dirty.
 * The instance's size never changes, so i_rwsem is not needed.
 *
 * As generic_perform_write() does, the source is faulted in first and
 * copied with page faults disabled while write_begin holds the page lock:
 * a fault on the source may take long (slow storage, a userfaultfd or
 * umem page) and the lock would stall truncation and MADV_REMOVE of this
 * page meanwhile. A copy cut short (the source went away again between
 * fault-in and copy) is retried; the page stays missing until it is whole.
 */
static int umem_copy_page(struct umem_instance *inst, pgoff_t pgoff,
			  const void __user *src)
{
	struct address_space *mapping = inst->shmem->f_mapping;
	const struct address_space_operations *aops = mapping->a_ops;
	loff_t pos = (loff_t)pgoff << PAGE_SHIFT;
	unsigned long left;
	struct page *page;
	void *fsdata;
	int ret;

	for (;;) {
		if (fault_in_readable(src, PAGE_SIZE))
			return -EFAULT;
		fsdata = NULL;
		ret = aops->write_begin(inst->shmem, mapping, pos, PAGE_SIZE,
					&page, &fsdata);
		if (ret)
			return ret;
		left = umem_copy_nofault(page, src);
		ret = aops->write_end(inst->shmem, mapping, pos, PAGE_SIZE,
				      PAGE_SIZE - left, page, fsdata);
		if (ret < 0)
			return ret;
		if (!left)
			return 0;
		if (fatal_signal_pending(current))
			return -EINTR;
		cond_resched();
	}
}
#else
/*
 * Newer write_begin signatures: take the page zeroed, then copy. As above,
 * the source is faulted in first and copied with page faults disabled, here
 * under the folio lock: a truncation (MADV_REMOVE) of this page while the
 * source was being faulted in took the folio out of the mapping, and the
 * copy would land in a page nobody can see while the page is marked
 * present. So the copy goes only into a folio still in the mapping, and is
 * retried otherwise.
 */
static int umem_copy_page(struct umem_instance *inst, pgoff_t pgoff,
			  const void __user *src)
{
	struct address_space *mapping = inst->shmem->f_mapping;
	unsigned long left;
	struct folio *folio;
	struct page *page;

	for (;;) {
		if (fault_in_readable(src, PAGE_SIZE))
			return -EFAULT;
		page = shmem_read_mapping_page_gfp(mapping, pgoff,
						   mapping_gfp_mask(mapping));
		if (IS_ERR(page))
			return PTR_ERR(page);
		folio = page_folio(page);
		left = PAGE_SIZE;
		folio_lock(folio);
		if (folio->mapping == mapping) {
			left = umem_copy_nofault(page, src);
			if (!left)
				folio_mark_dirty(folio);
		}
		folio_unlock(folio);
		folio_put(folio);
		if (!left)
			return 0;
		if (fatal_signal_pending(current))
			return -EINTR;
		cond_resched();
	}
}
#endif

/*
 * A fill failed half way: punch the page out again, so that a page that is
 * not present is always a hole (zeros cost nothing, and nothing stale can
 * reach a mapping), and have its waiters ask again, since the server that
 * read their record believes it was served.
 */
static void umem_fill_failed(struct umem_instance *inst, pgoff_t pgoff)
{
	loff_t pos = (loff_t)pgoff << PAGE_SHIFT;

	shmem_truncate_range(file_inode(inst->shmem), pos, pos + PAGE_SIZE - 1);
	umem_forget_request(inst, pgoff);
}

/*
 * Make one page present from @src (NULL: zeros; a page that is not present
 * is a hole, so that is only a bit). Returns 1 when it did, 0 when the
 * page was present already or another call is filling it (and will make
 * it present, or have it asked for again), or -errno. A missing page of
 * this instance's own mappings as @src fails with -EFAULT (the caller is
 * on inst->fillers, see umem_fill_begin()).
 */
static int umem_fill_page(struct umem_instance *inst, pgoff_t pgoff,
			  const void __user *src)
{
	int ret = 0;

	if (umem_page_present(inst, pgoff))
		return 0;
	if (test_and_set_bit_lock(pgoff, inst->filling))
		return 0;
	if (umem_page_present(inst, pgoff))
		goto unlock;

	if (src) {
		struct mem_cgroup *old = umem_charge_begin(inst);

		ret = umem_copy_page(inst, pgoff, src);
		umem_charge_end(old);
	}
	if (ret) {
		umem_fill_failed(inst, pgoff);
	} else {
		smp_mb__before_atomic();	/* contents before the bit */
		set_bit(pgoff, inst->present);
		atomic64_inc(&inst->npresent);
		ret = 1;
	}
unlock:
	clear_bit_unlock(pgoff, inst->filling);
	return ret;
}

static void umem_wake_faults(struct umem_instance *inst)
{
	if (wq_has_sleeper(&inst->fault_wq))
		wake_up_all(&inst->fault_wq);
}

/* A page-aligned, nonempty range inside the instance. */
static bool umem_range_valid(struct umem_instance *inst, u64 offset, u64 len)
{
	return PAGE_ALIGNED(offset) && PAGE_ALIGNED(len) && len &&
	       offset < inst->size && len <= inst->size - offset;
}

/*
 * Fill [offset, offset + len) from @src (NULL: zeros), adding to @done and
 * @skipped. Stops at the first error; a fatal signal ends it with -EINTR.
 */
static int umem_fill_range(struct umem_instance *inst, u64 offset, u64 len,
			   u64 src, u64 *done, u64 *skipped)
{
	pgoff_t pgoff = offset >> PAGE_SHIFT;
	pgoff_t end = pgoff + (len >> PAGE_SHIFT);
	int ret = 0;

	for (; pgoff < end; pgoff++) {
		ret = umem_fill_page(inst, pgoff, src ? u64_to_user_ptr(src) : NULL);
		if (ret < 0)
			break;
		if (ret)
			(*done)++;
		else
			(*skipped)++;
		if (src)
			src += PAGE_SIZE;
		if (fatal_signal_pending(current)) {
			ret = -EINTR;
			break;
		}
		cond_resched();
	}
	umem_wake_faults(inst);
	return ret < 0 ? ret : 0;
}

static long umem_ioctl_fill(struct umem_instance *inst,
			    struct umem_fill __user *uarg)
{
	struct umem_fill_range on_stack[4], *ranges;
	struct umem_filler filler;
	struct umem_fill fill;
	u64 copied = 0, skipped = 0;
	long ret = 0;
	u32 i;

	/* The input part only: copied and skipped are out fields, last. */
	BUILD_BUG_ON(offsetof(struct umem_fill, copied) != 16);
	BUILD_BUG_ON(offsetofend(struct umem_fill, skipped) != sizeof(struct umem_fill));
	if (copy_from_user(&fill, uarg, offsetof(struct umem_fill, copied)))
		return -EFAULT;
	if (fill.flags || !fill.count || fill.count > UMEM_FILL_MAX_RANGES)
		return -EINVAL;
	if (READ_ONCE(inst->dead))
		return -ENODEV;

	if (fill.count <= ARRAY_SIZE(on_stack)) {
		ranges = on_stack;
		if (copy_from_user(ranges, u64_to_user_ptr(fill.ranges),
				   fill.count * sizeof(*ranges)))
			return -EFAULT;
	} else {
		ranges = memdup_user(u64_to_user_ptr(fill.ranges),
				     array_size(fill.count, sizeof(*ranges)));
		if (IS_ERR(ranges))
			return PTR_ERR(ranges);
	}
	for (i = 0; i < fill.count; i++) {
		if (!umem_range_valid(inst, ranges[i].offset, ranges[i].len) ||
		    !ranges[i].src) {
			ret = -EINVAL;
			goto out;
		}
	}

	umem_fill_begin(inst, &filler);
	for (i = 0; i < fill.count && !ret; i++)
		ret = umem_fill_range(inst, ranges[i].offset, ranges[i].len,
				      ranges[i].src, &copied, &skipped);
	umem_fill_end(inst, &filler);

	atomic64_add(copied, &inst->stat_filled);
	atomic64_add(skipped, &inst->stat_skipped);
	if (put_user(copied, &uarg->copied) || put_user(skipped, &uarg->skipped))
		ret = -EFAULT;
out:
	if (ranges != on_stack)
		kfree(ranges);
	return ret;
}

static long umem_ioctl_zero(struct umem_instance *inst,
			    struct umem_zero __user *uarg)
{
	struct umem_zero zero;
	u64 zeroed = 0, skipped = 0;
	long ret;

	BUILD_BUG_ON(offsetof(struct umem_zero, zeroed) != 24);
	BUILD_BUG_ON(offsetofend(struct umem_zero, skipped) != sizeof(struct umem_zero));
	if (copy_from_user(&zero, uarg, offsetof(struct umem_zero, zeroed)))
		return -EFAULT;
	if (zero.flags || !umem_range_valid(inst, zero.offset, zero.len))
		return -EINVAL;
	if (READ_ONCE(inst->dead))
		return -ENODEV;

	ret = umem_fill_range(inst, zero.offset, zero.len, 0, &zeroed, &skipped);
	atomic64_add(zeroed, &inst->stat_zeroed);
	atomic64_add(skipped, &inst->stat_skipped);
	if (put_user(zeroed, &uarg->zeroed) || put_user(skipped, &uarg->skipped))
		ret = -EFAULT;
	return ret;
}

static long umem_ioctl_stats(struct umem_instance *inst,
			     struct umem_stats __user *uarg)
{
	struct umem_stats stats;

	umem_read_stats(inst, &stats);
	return copy_to_user(uarg, &stats, sizeof(stats)) ? -EFAULT : 0;
}

static long umem_ioctl_bitmap(struct umem_instance *inst,
			      struct umem_bitmap __user *uarg)
{
	struct umem_bitmap req;
	u64 __user *out;
	u64 words, i, tail;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (req.start % 64 || req.start >= inst->npages || !req.pages ||
	    req.pages > inst->npages - req.start)
		return -EINVAL;

	out = u64_to_user_ptr(req.bitmap);
	words = DIV_ROUND_UP(req.pages, 64);
	tail = req.pages % 64;
	for (i = 0; i < words; i++) {
		u64 word = READ_ONCE(inst->present[req.start / 64 + i]);

		if (i == words - 1 && tail)
			word &= (1ULL << tail) - 1;
		if (put_user(word, &out[i]))
			return -EFAULT;
	}
	return 0;
}

static long umem_server_ioctl(struct file *file, unsigned int cmd,
			      unsigned long arg)
{
	struct umem_instance *inst = file->private_data;
	void __user *uarg = (void __user *)arg;

	switch (cmd) {
	case UMEM_FILL:
		return umem_ioctl_fill(inst, uarg);
	case UMEM_ZERO:
		return umem_ioctl_zero(inst, uarg);
	case UMEM_STATS:
		return umem_ioctl_stats(inst, uarg);
	case UMEM_BITMAP:
		return umem_ioctl_bitmap(inst, uarg);
	}
	return -ENOTTY;
}

static int umem_server_release(struct inode *inode, struct file *file)
{
	struct umem_instance *inst = file->private_data;

	/* Reset before another server can attach (umem_server_open()). */
	mutex_lock(&inst->lock);
	umem_reset_requests(inst);
	inst->served = false;
	umem_test_park(UMEM_PARK_SERVER_RELEASE);
	mutex_unlock(&inst->lock);
	umem_put(inst);
	return 0;
}

static const struct file_operations umem_server_fops = {
	.owner		= THIS_MODULE,
	.release	= umem_server_release,
	.read		= umem_server_read,
	.poll		= umem_server_poll,
	.unlocked_ioctl	= umem_server_ioctl,
	.compat_ioctl	= compat_ptr_ioctl,
	.llseek		= noop_llseek,
};

/*
 * Become the instance's one server. Returns the new file, holding its own
 * reference on @inst, or ERR_PTR(-EBUSY) if a server is attached.
 */
struct file *umem_server_open(struct umem_instance *inst, u64 flags)
{
	int f_flags = O_RDWR;
	struct file *file;

	if (flags & UMEM_FD_NONBLOCK)
		f_flags |= O_NONBLOCK;

	mutex_lock(&inst->lock);
	if (inst->served) {
		mutex_unlock(&inst->lock);
		return ERR_PTR(-EBUSY);
	}
	umem_get(inst);
	file = anon_inode_getfile("[umem-server]", &umem_server_fops, inst, f_flags);
	if (IS_ERR(file))
		umem_put(inst);
	else
		inst->served = true;
	mutex_unlock(&inst->lock);
	return file;
}
