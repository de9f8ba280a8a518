/* SPDX-License-Identifier: GPL-2.0 */
/*
 * umem's kernel version guards, in one place: each helper hides one
 * interface that changed between the kernels umem builds on (6.1 on).
 */
#ifndef UMEM_COMPAT_H
#define UMEM_COMPAT_H

#include <linux/device.h>
#include <linux/fs.h>
#include <linux/mm.h>
#include <linux/shmem_fs.h>
#include <linux/version.h>

/* 6.2 made struct device_type's ->devnode() take a const device. */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 2, 0)
#define UMEM_DEVNODE_CONST const
#else
#define UMEM_DEVNODE_CONST
#endif

/* 6.4 dropped class_create()'s module argument. */
static inline struct class *umem_class_create(const char *name)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 4, 0)
	return class_create(name);
#else
	return class_create(THIS_MODULE, name);
#endif
}

/* 6.3 made vm_flags read-only outside the vm_flags_*() helpers. */
static inline void umem_vma_set_flags(struct vm_area_struct *vma, vm_flags_t flags)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_set(vma, flags);
#else
	vma->vm_flags |= flags;
#endif
}

/* 6.6 added per-vma locks: a fault may hold one instead of mmap_lock. */
static inline void umem_release_fault_lock(struct vm_fault *vmf)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 6, 0)
	release_fault_lock(vmf);
#else
	mmap_read_unlock(vmf->vma->vm_mm);
#endif
}

/* 6.17 replaced call_mmap() with vfs_mmap(). */
static inline int umem_file_mmap(struct file *file, struct vm_area_struct *vma)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 17, 0)
	return vfs_mmap(file, vma);
#else
	return call_mmap(file, vma);
#endif
}

/*
 * Before 6.12, a_ops->write_begin() and ->write_end() take a struct page;
 * server.c copies fills through them then (and through a zeroed page from
 * shmem_read_mapping_page_gfp() after).
 */
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 12, 0)
#define UMEM_HAVE_PAGE_WRITE_BEGIN
#endif

/* 7.0 made shmem_file_setup*() take a vma_flags_t instead of VM_* flags. */
static inline struct file *umem_shmem_file_setup(struct vfsmount *mnt, const char *name,
						 loff_t size, vm_flags_t flags)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(7, 0, 0)
	return shmem_file_setup_with_mnt(mnt, name, size, legacy_to_vma_flags(flags));
#else
	return shmem_file_setup_with_mnt(mnt, name, size, flags);
#endif
}

#endif /* UMEM_COMPAT_H */
