/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * umem: memory whose pages are supplied on demand by a userspace server.
 *
 * This header is the one source of truth for the umem ABI. The kernel
 * module includes it, and the Python daemon builds its cffi binding from
 * it. Documentation: docs/kernel-abi.md.
 *
 * Three kinds of file:
 *
 *  /dev/umem/control  root only. UMEM_API handshake, then UMEM_CREATE,
 *                     UMEM_ATTACH, UMEM_DESTROY and UMEM_LIST.
 *  /dev/umem/<name>   one per instance, for the memory user (QEMU): open,
 *                     mmap(MAP_SHARED) and llseek only. Owner, group and
 *                     mode come from UMEM_CREATE (default root:root 0600).
 *  server fd          returned by UMEM_CREATE and UMEM_ATTACH, one per
 *                     instance at a time: read() fault records, poll(),
 *                     UMEM_FILL, UMEM_ZERO, UMEM_STATS, UMEM_BITMAP.
 *
 * Conventions (Documentation/process/botching-up-ioctls.rst): only fixed
 * size types, explicit padding, struct sizes a multiple of 8, pointers
 * passed as __u64, fields the kernel writes back last, nonzero reserved
 * fields rejected with EINVAL. UMEM_CREATE's struct is size-versioned
 * (argsz, the copy_struct_from_user() rules): a newer caller's longer
 * struct is accepted when the part this kernel does not know is zero.
 *
 * Read-only counters, without the server fd, are in sysfs:
 * /sys/class/umem/umem!<name>/stats/<field of struct umem_stats>, and
 * .../served and .../tag (hex, root only) beside them.
 */
#ifndef _UAPI_LINUX_UMEM_H
#define _UAPI_LINUX_UMEM_H

#include <linux/types.h>
#include <linux/ioctl.h>

/* 2: size-versioned UMEM_CREATE with owner, mode, cgroup and tag; CREATE
 * and ATTACH return the server fd. */
#define UMEM_API_VERSION 2

/* Instance names: [A-Za-z0-9._-]{1,63}, NUL terminated; not "control", "." or "..". */
#define UMEM_NAME_MAX 64

/* The opaque migration tag an instance is created with. */
#define UMEM_TAG_SIZE 16

/* Largest instance: 1 TiB. */
#define UMEM_SIZE_MAX (1ULL << 40)

/* Largest number of ranges in one UMEM_FILL call. */
#define UMEM_FILL_MAX_RANGES 1024

/* Feature bits negotiated by UMEM_API. */
#define UMEM_FEATURE_ATTACH	(1ULL << 0)	/* server fd can be re-attached */
#define UMEM_FEATURE_ZERO	(1ULL << 1)	/* UMEM_ZERO */
#define UMEM_FEATURE_BITMAP	(1ULL << 2)	/* UMEM_BITMAP */
#define UMEM_FEATURE_FAULT_WRITE (1ULL << 3)	/* UMEM_FAULT_FLAG_WRITE */
#define UMEM_FEATURE_OWNER	(1ULL << 4)	/* UMEM_CREATE_OWNER, UMEM_CREATE_MODE */
#define UMEM_FEATURE_CGROUP	(1ULL << 5)	/* UMEM_CREATE_CGROUP; fills charged to the guest */
#define UMEM_FEATURE_TAG	(1ULL << 6)	/* a migration tag, returned by ATTACH and LIST */
#define UMEM_FEATURE_SYSFS_STATS (1ULL << 7)	/* counters in sysfs, without the server fd */
#define UMEM_API_FEATURES (UMEM_FEATURE_ATTACH | UMEM_FEATURE_ZERO | \
			   UMEM_FEATURE_BITMAP | UMEM_FEATURE_FAULT_WRITE | \
			   UMEM_FEATURE_OWNER | UMEM_FEATURE_CGROUP | \
			   UMEM_FEATURE_TAG | UMEM_FEATURE_SYSFS_STATS)

/* Flags of UMEM_CREATE and UMEM_ATTACH, applied to the new server fd. */
#define UMEM_FD_CLOEXEC		(1ULL << 0)
#define UMEM_FD_NONBLOCK	(1ULL << 1)
#define UMEM_FD_FLAGS (UMEM_FD_CLOEXEC | UMEM_FD_NONBLOCK)

/* Flags of UMEM_CREATE only: which optional fields are set. */
#define UMEM_CREATE_OWNER	(1ULL << 8)	/* uid and gid: the node's owner */
#define UMEM_CREATE_MODE	(1ULL << 9)	/* mode: the node's permission bits */
#define UMEM_CREATE_CGROUP	(1ULL << 10)	/* cgroup_fd: charge fills to this cgroup */
#define UMEM_CREATE_FLAGS (UMEM_FD_FLAGS | UMEM_CREATE_OWNER | \
			   UMEM_CREATE_MODE | UMEM_CREATE_CGROUP)

/* The first struct umem_create (API 2); later ones only grow. */
#define UMEM_CREATE_SIZE_VER0 120

/* struct umem_list_entry.flags */
#define UMEM_INSTANCE_SERVED	(1U << 0)	/* a server fd is open */

/* read() records: struct umem_fault.event */
#define UMEM_EVENT_FAULT	0x12

/* struct umem_fault.flags */
#define UMEM_FAULT_FLAG_WRITE	(1U << 0)

struct umem_api {
	__u64 api;		/* in: UMEM_API_VERSION */
	__u64 features;		/* in: wanted; out: supported */
	__u64 ioctls;		/* out: 1ULL << _UMEM_xxx of each usable ioctl */
};

/*
 * UMEM_CREATE returns the new instance's server fd. A field whose flag is
 * not set must be zero. Without UMEM_CREATE_OWNER the node is root:root;
 * without UMEM_CREATE_MODE it is 0600. Without UMEM_CREATE_CGROUP, fill
 * pages are charged to the memory cgroup of the instance's first mapper
 * (the root cgroup until there is one), never to the filler's.
 */
struct umem_create {
	__u32 argsz;		/* sizeof(struct umem_create) the caller knows */
	__u32 mode;		/* UMEM_CREATE_MODE: permission bits, 0..0777 */
	__u64 flags;		/* UMEM_FD_* | UMEM_CREATE_* */
	__u64 size;		/* bytes, page aligned, 1..UMEM_SIZE_MAX */
	__u8 name[UMEM_NAME_MAX];
	__u32 uid;		/* UMEM_CREATE_OWNER, in the caller's user namespace */
	__u32 gid;		/* UMEM_CREATE_OWNER */
	__s32 cgroup_fd;	/* UMEM_CREATE_CGROUP: an open cgroup2 directory */
	__u32 pad;
	__u8 tag[UMEM_TAG_SIZE];	/* opaque: which migration this instance is */
};

/* UMEM_ATTACH returns the server fd of an existing instance. */
struct umem_attach {
	__u8 name[UMEM_NAME_MAX];
	__u64 flags;		/* UMEM_FD_* */
	__u8 tag[UMEM_TAG_SIZE];	/* out: the instance's tag */
};

struct umem_destroy {
	__u8 name[UMEM_NAME_MAX];
};

struct umem_list_entry {
	__u8 name[UMEM_NAME_MAX];
	__u64 size;
	__u64 present;		/* pages */
	__u32 flags;		/* UMEM_INSTANCE_* */
	__u32 pad;
	__u8 tag[UMEM_TAG_SIZE];
};

struct umem_list {
	__u64 entries;		/* pointer to struct umem_list_entry[capacity] */
	__u32 capacity;
	__u32 count;		/* out: number of instances (may exceed capacity) */
};

/* One fault record, as read() from the server fd. */
struct umem_fault {
	__u32 event;		/* UMEM_EVENT_FAULT */
	__u32 flags;		/* UMEM_FAULT_FLAG_* */
	__u64 offset;		/* page-aligned byte offset in the instance */
	__u64 reserved[2];	/* zero */
};

struct umem_fill_range {
	__u64 offset;		/* page aligned */
	__u64 len;		/* page aligned, nonzero */
	__u64 src;		/* pointer to len bytes */
};

struct umem_fill {
	__u64 ranges;		/* pointer to struct umem_fill_range[count] */
	__u32 count;		/* 1..UMEM_FILL_MAX_RANGES */
	__u32 flags;		/* zero */
	__u64 copied;		/* out: pages copied in */
	__u64 skipped;		/* out: pages present (or being filled by another call), left alone */
};

struct umem_zero {
	__u64 offset;		/* page aligned */
	__u64 len;		/* page aligned, nonzero */
	__u64 flags;		/* zero */
	__u64 zeroed;		/* out: pages made present as zeros */
	__u64 skipped;		/* out: pages present (or being filled by another call), left alone */
};

struct umem_stats {
	__u64 size;		/* bytes */
	__u64 pages;		/* size / page size */
	__u64 present;		/* pages present */
	__u64 requested;	/* fault records queued for a server */
	__u64 faults;		/* faults that had to wait for a page */
	__u64 waiters;		/* tasks waiting for a page right now */
	__u64 wait_ns;		/* total time tasks spent waiting */
	__u64 filled;		/* pages copied in by UMEM_FILL */
	__u64 zeroed;		/* pages made present by UMEM_ZERO */
	__u64 skipped;		/* fill/zero pages skipped: present or being filled */
};

struct umem_bitmap {
	__u64 start;		/* first page, a multiple of 64 */
	__u64 pages;		/* number of pages, 1..pages - start */
	__u64 bitmap;		/* pointer to __u64[(pages + 63) / 64], bit n = page start + n */
};

/* ioctl numbers; the bit positions in struct umem_api.ioctls */
#define _UMEM_API	0x00
#define _UMEM_CREATE	0x01
#define _UMEM_ATTACH	0x02
#define _UMEM_DESTROY	0x03
#define _UMEM_LIST	0x04
#define _UMEM_FILL	0x10
#define _UMEM_ZERO	0x11
#define _UMEM_STATS	0x12
#define _UMEM_BITMAP	0x13

#define UMEM_IOCTL_MAGIC 0xB9

/* control node */
#define UMEM_API	_IOWR(UMEM_IOCTL_MAGIC, _UMEM_API, struct umem_api)
/* size-versioned by argsz, so its number does not encode a size */
#define UMEM_CREATE	_IO(UMEM_IOCTL_MAGIC, _UMEM_CREATE)
#define UMEM_ATTACH	_IOWR(UMEM_IOCTL_MAGIC, _UMEM_ATTACH, struct umem_attach)
#define UMEM_DESTROY	_IOW(UMEM_IOCTL_MAGIC, _UMEM_DESTROY, struct umem_destroy)
#define UMEM_LIST	_IOWR(UMEM_IOCTL_MAGIC, _UMEM_LIST, struct umem_list)

/* server fd */
#define UMEM_FILL	_IOWR(UMEM_IOCTL_MAGIC, _UMEM_FILL, struct umem_fill)
#define UMEM_ZERO	_IOWR(UMEM_IOCTL_MAGIC, _UMEM_ZERO, struct umem_zero)
#define UMEM_STATS	_IOR(UMEM_IOCTL_MAGIC, _UMEM_STATS, struct umem_stats)
#define UMEM_BITMAP	_IOW(UMEM_IOCTL_MAGIC, _UMEM_BITMAP, struct umem_bitmap)

#define UMEM_CONTROL_IOCTLS ((1ULL << _UMEM_API) | (1ULL << _UMEM_CREATE) | \
			     (1ULL << _UMEM_ATTACH) | (1ULL << _UMEM_DESTROY) | \
			     (1ULL << _UMEM_LIST))
#define UMEM_SERVER_IOCTLS ((1ULL << _UMEM_FILL) | (1ULL << _UMEM_ZERO) | \
			    (1ULL << _UMEM_STATS) | (1ULL << _UMEM_BITMAP))

#endif /* _UAPI_LINUX_UMEM_H */
