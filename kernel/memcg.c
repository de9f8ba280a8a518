// SPDX-License-Identifier: GPL-2.0
/*
 * Whom an instance's pages are charged to.
 *
 * A fill allocates shmem pages with no vma, so the memory cgroup charged
 * would be the filler's: the daemon would pay for every guest it serves,
 * and the guest's own limit (QEMU's memory.max) would bound nothing. An
 * instance therefore fixes its memory cgroup once: the cgroup named at
 * UMEM_CREATE, or else the first mapper's (QEMU's). Until either is known,
 * fills are charged to the root cgroup, never to the filler or creator.
 * Each fill runs under set_active_memcg(), which shmem's page cache charge
 * honours when it has no mm to charge.
 *
 * Pages a mapper faults in itself (holes made present by UMEM_ZERO) are
 * charged as any shmem fault is: to the faulting mm's cgroup.
 */
#include <linux/cgroup.h>
#include <linux/memcontrol.h>
#include <linux/sched/mm.h>

#include "umem.h"

static struct mem_cgroup *umem_root_memcg;

void umem_memcg_init(void)
{
	if (mem_cgroup_disabled())
		return;
	umem_root_memcg = mem_cgroup_from_css(cgroup_get_e_css(&cgrp_dfl_root.cgrp,
							       &memory_cgrp_subsys));
}

void umem_memcg_exit(void)
{
	mem_cgroup_put(umem_root_memcg);
}

/*
 * The memory cgroup of the open cgroup2 directory @fd (its nearest ancestor
 * with the memory controller on), with a reference; NULL if memory cgroups
 * are off.
 */
struct mem_cgroup *umem_memcg_from_fd(int fd)
{
	struct cgroup_subsys_state *css;
	struct cgroup *cgrp;

	cgrp = cgroup_get_from_fd(fd);
	if (IS_ERR(cgrp))
		return ERR_CAST(cgrp);
	css = mem_cgroup_disabled() ? NULL : cgroup_get_e_css(cgrp, &memory_cgrp_subsys);
	cgroup_put(cgrp);
	return mem_cgroup_from_css(css);
}

/* Give @inst the memory cgroup @memcg (a reference) unless it has one. */
void umem_memcg_set(struct umem_instance *inst, struct mem_cgroup *memcg)
{
	if (memcg && cmpxchg(&inst->memcg, NULL, memcg))
		mem_cgroup_put(memcg);
}

/* The mapping task is the guest: charge it, unless a cgroup was named. */
void umem_memcg_adopt_mapper(struct umem_instance *inst)
{
	if (!READ_ONCE(inst->memcg))
		umem_memcg_set(inst, get_mem_cgroup_from_mm(current->mm));
}

void umem_memcg_put(struct umem_instance *inst)
{
	mem_cgroup_put(inst->memcg);
}

/* Charge the page allocations that follow to @inst's cgroup. */
struct mem_cgroup *umem_charge_begin(struct umem_instance *inst)
{
	struct mem_cgroup *memcg = READ_ONCE(inst->memcg);

	return set_active_memcg(memcg ? memcg : umem_root_memcg);
}

void umem_charge_end(struct mem_cgroup *old)
{
	set_active_memcg(old);
}
