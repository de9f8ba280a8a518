// SPDX-License-Identifier: GPL-2.0
/*
 * umem: memory whose pages a userspace server supplies on demand.
 *
 * The control node /dev/umem/control adds, removes and finds instances.
 * Every caller must first agree on the API with UMEM_API; until then every
 * other command fails with EINVAL. The registry of instances is guarded by
 * one mutex, umem_lock, taken killably.
 *
 * Minors are handed out in increasing order over the whole minor space,
 * wrapping at its end (umem_alloc_minor()): an open finds its instance by
 * minor, so a minor must not come back while stale references to its
 * old node (an O_PATH fd, a bind mount, a mknod copy in a container's
 * /dev) may still be around. One comes back only after the allocator has
 * gone round all UMEM_MINOR_COUNT minors since it was freed.
 */
#include <linux/ctype.h>
#include <linux/device.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include <linux/user_namespace.h>

#include "umem.h"

#define UMEM_MINOR_COUNT (1U << MINORBITS)
#define UMEM_MAX_INSTANCES 1024

enum umem_control_state {
	UMEM_CONTROL_WAIT_API,
	UMEM_CONTROL_RUNNING,
};

/* One open control fd. @lock serializes UMEM_API: test and set of @state. */
struct umem_control {
	struct mutex lock;
	enum umem_control_state state;	/* written under @lock, read with READ_ONCE() */
};

static DEFINE_MUTEX(umem_lock);
static LIST_HEAD(umem_instances);	/* protected by umem_lock */
static unsigned int umem_instance_count;	/* protected by umem_lock */
static unsigned int umem_next_minor;	/* protected by umem_lock */
static DEFINE_IDA(umem_minor_ida);
static dev_t umem_devt;
static struct class *umem_class;

static struct umem_instance *umem_find_name(const char *name)
{
	struct umem_instance *inst;

	lockdep_assert_held(&umem_lock);
	list_for_each_entry(inst, &umem_instances, node)
		if (!strcmp(inst->name, name))
			return inst;
	return NULL;
}

/* The instance whose node has @minor, with a reference, or NULL. */
struct umem_instance *umem_find_minor(int minor)
{
	struct umem_instance *inst, *found = NULL;

	mutex_lock(&umem_lock);
	list_for_each_entry(inst, &umem_instances, node) {
		if (inst->minor == minor) {
			umem_get(inst);
			found = inst;
			break;
		}
	}
	mutex_unlock(&umem_lock);
	return found;
}

/* [A-Za-z0-9._-]{1,63}, NUL terminated, not "control", ".", "..". */
static int umem_check_name(const char *name)
{
	size_t len = strnlen(name, UMEM_NAME_MAX);
	size_t i;

	if (!len || len == UMEM_NAME_MAX)
		return -EINVAL;
	for (i = 0; i < len; i++)
		if (!isascii(name[i]) || (!isalnum(name[i]) && !strchr("._-", name[i])))
			return -EINVAL;
	if (!strcmp(name, "control") || !strcmp(name, ".") || !strcmp(name, ".."))
		return -EINVAL;
	return 0;
}

/* The next minor at or after the cursor, wrapping once at the end. */
static int umem_alloc_minor(void)
{
	int minor;

	lockdep_assert_held(&umem_lock);
	minor = ida_alloc_range(&umem_minor_ida, umem_next_minor,
				UMEM_MINOR_COUNT - 1, GFP_KERNEL);
	if (minor == -ENOSPC && umem_next_minor)
		minor = ida_alloc_range(&umem_minor_ida, 0, UMEM_MINOR_COUNT - 1,
					GFP_KERNEL);
	if (minor >= 0)
		umem_next_minor = (minor + 1) % UMEM_MINOR_COUNT;
	return minor;
}

/* devtmpfs and udev (DEVUID, DEVGID, DEVMODE) take the node's owner here. */
static char *umem_devnode(UMEM_DEVNODE_CONST struct device *dev, umode_t *mode,
			  kuid_t *uid, kgid_t *gid)
{
	struct umem_instance *inst = dev_get_drvdata(dev);

	if (mode)
		*mode = inst->mode;
	if (uid)
		*uid = inst->uid;
	if (gid)
		*gid = inst->gid;
	return NULL;	/* the name: "umem!<name>" with '!' turned into '/' */
}

static const struct device_type umem_instance_type = {
	.name		= "umem-instance",
	.groups		= umem_instance_groups,
	.devnode	= umem_devnode,
};

static void umem_device_release(struct device *dev)
{
	kfree(dev);
}

/* Register @inst's device: its sysfs directory, then its node. */
static int umem_add_device(struct umem_instance *inst, dev_t devt)
{
	struct device *dev = kzalloc(sizeof(*dev), GFP_KERNEL);
	int ret;

	if (!dev)
		return -ENOMEM;
	device_initialize(dev);
	dev->devt = devt;
	dev->class = umem_class;
	dev->type = &umem_instance_type;
	dev->release = umem_device_release;
	dev_set_drvdata(dev, inst);
	ret = dev_set_name(dev, "umem!%s", inst->name);
	if (!ret)
		ret = device_add(dev);
	if (ret) {
		put_device(dev);
		return ret;
	}
	inst->dev = dev;
	return 0;
}

/* Give @inst its node and add it to the registry. */
static int umem_publish(struct umem_instance *inst)
{
	dev_t devt;
	int ret;

	lockdep_assert_held(&umem_lock);
	if (umem_find_name(inst->name))
		return -EEXIST;
	if (umem_instance_count >= UMEM_MAX_INSTANCES)
		return -ENFILE;
	ret = umem_alloc_minor();
	if (ret < 0)
		return ret == -ENOSPC ? -ENFILE : ret;
	inst->minor = ret;
	devt = MKDEV(MAJOR(umem_devt), inst->minor);

	ret = -ENOMEM;
	inst->cdev = cdev_alloc();
	if (!inst->cdev)
		goto free_minor;
	inst->cdev->owner = THIS_MODULE;
	inst->cdev->ops = &umem_node_fops;
	ret = cdev_add(inst->cdev, devt, 1);
	if (ret)
		goto put_cdev;
	ret = umem_add_device(inst, devt);
	if (ret)
		goto del_cdev;
	list_add_tail(&inst->node, &umem_instances);
	umem_instance_count++;
	return 0;

del_cdev:
	cdev_del(inst->cdev);
	inst->cdev = NULL;
	goto free_minor;
put_cdev:
	kobject_put(&inst->cdev->kobj);
	inst->cdev = NULL;
free_minor:
	ida_free(&umem_minor_ida, inst->minor);
	inst->minor = -1;
	return ret;
}

/*
 * Remove @inst's node, sysfs directory and registry entry at once.
 * device_unregister() waits for running sysfs ->show()s.
 */
static void umem_unpublish(struct umem_instance *inst)
{
	lockdep_assert_held(&umem_lock);
	list_del_init(&inst->node);
	umem_instance_count--;
	device_unregister(inst->dev);
	inst->dev = NULL;
	cdev_del(inst->cdev);
	inst->cdev = NULL;
	ida_free(&umem_minor_ida, inst->minor);
	inst->minor = -1;
}

/* Caller holds ctl->lock: two handshakes on one fd cannot both succeed. */
static long umem_api_locked(struct umem_control *ctl, struct umem_api __user *uarg)
{
	struct umem_api api;

	lockdep_assert_held(&ctl->lock);
	if (ctl->state != UMEM_CONTROL_WAIT_API)
		return -EINVAL;
	/* The input part only: ioctls is an out field, last. */
	BUILD_BUG_ON(offsetof(struct umem_api, ioctls) != 16);
	BUILD_BUG_ON(offsetofend(struct umem_api, ioctls) != sizeof(struct umem_api));
	if (copy_from_user(&api, uarg, offsetof(struct umem_api, ioctls)))
		return -EFAULT;
	if (api.api != UMEM_API_VERSION || api.features & ~UMEM_API_FEATURES) {
		memset(&api, 0, sizeof(api));
		return copy_to_user(uarg, &api, sizeof(api)) ? -EFAULT : -EINVAL;
	}
	api.features = UMEM_API_FEATURES;
	api.ioctls = UMEM_CONTROL_IOCTLS | UMEM_SERVER_IOCTLS;
	if (copy_to_user(uarg, &api, sizeof(api)))
		return -EFAULT;
	WRITE_ONCE(ctl->state, UMEM_CONTROL_RUNNING);
	return 0;
}

static long umem_ioctl_api(struct umem_control *ctl, struct umem_api __user *uarg)
{
	long ret = mutex_lock_killable(&ctl->lock);

	if (ret)
		return ret;
	ret = umem_api_locked(ctl, uarg);
	mutex_unlock(&ctl->lock);
	return ret;
}

static int umem_fd_flags(u64 flags)
{
	return (flags & UMEM_FD_CLOEXEC) ? O_CLOEXEC : 0;
}

/* The caller's struct umem_create, of any size from UMEM_CREATE_SIZE_VER0. */
static int umem_copy_create(struct umem_create *req,
			    struct umem_create __user *uarg)
{
	u32 argsz;

	BUILD_BUG_ON(offsetof(struct umem_create, argsz) != 0);
	if (get_user(argsz, &uarg->argsz))
		return -EFAULT;
	if (argsz < UMEM_CREATE_SIZE_VER0)
		return -EINVAL;
	if (argsz > PAGE_SIZE)
		return -E2BIG;
	return copy_struct_from_user(req, sizeof(*req), uarg, argsz);
}

/* Every field valid, and every field whose flag is clear zero. */
static int umem_check_create(const struct umem_create *req)
{
	int ret = umem_check_name((const char *)req->name);

	if (ret)
		return ret;
	if (req->pad || req->flags & ~UMEM_CREATE_FLAGS)
		return -EINVAL;
	if (!(req->flags & UMEM_CREATE_OWNER) && (req->uid || req->gid))
		return -EINVAL;
	if (req->flags & UMEM_CREATE_MODE ? !req->mode || req->mode & ~0777 : req->mode)
		return -EINVAL;
	if (!(req->flags & UMEM_CREATE_CGROUP) && req->cgroup_fd)
		return -EINVAL;
	if (!req->size || !PAGE_ALIGNED(req->size))
		return -EINVAL;
	if (req->size > UMEM_SIZE_MAX)
		return -EFBIG;
	return 0;
}

/* The node's owner and group, in the caller's user namespace. */
static int umem_resolve_owner(const struct umem_create *req, kuid_t *uid, kgid_t *gid)
{
	*uid = GLOBAL_ROOT_UID;
	*gid = GLOBAL_ROOT_GID;
	if (!(req->flags & UMEM_CREATE_OWNER))
		return 0;
	*uid = make_kuid(current_user_ns(), req->uid);
	*gid = make_kgid(current_user_ns(), req->gid);
	return uid_valid(*uid) && gid_valid(*gid) ? 0 : -EINVAL;
}

/* Give the new @inst what @req names: node owner and mode, tag, cgroup. */
static int umem_apply_create(struct umem_instance *inst,
			     const struct umem_create *req, kuid_t uid, kgid_t gid)
{
	struct mem_cgroup *memcg;

	inst->uid = uid;
	inst->gid = gid;
	inst->mode = req->flags & UMEM_CREATE_MODE ? req->mode : 0600;
	memcpy(inst->tag, req->tag, sizeof(inst->tag));
	if (!(req->flags & UMEM_CREATE_CGROUP))
		return 0;
	memcg = umem_memcg_from_fd(req->cgroup_fd);
	if (IS_ERR(memcg))
		return PTR_ERR(memcg);
	umem_memcg_set(inst, memcg);
	return 0;
}

/* Returns the new instance's server fd. */
static long umem_ioctl_create(struct umem_create __user *uarg)
{
	struct umem_instance *inst;
	struct umem_create req;
	struct file *server;
	kuid_t uid;
	kgid_t gid;
	int fd, ret;

	ret = umem_copy_create(&req, uarg);
	if (!ret)
		ret = umem_check_create(&req);
	if (!ret)
		ret = umem_resolve_owner(&req, &uid, &gid);
	if (ret)
		return ret;

	inst = umem_instance_new((const char *)req.name, req.size);
	if (IS_ERR(inst))
		return PTR_ERR(inst);
	ret = umem_apply_create(inst, &req, uid, gid);
	if (ret)
		goto put_inst;
	server = umem_server_open(inst, req.flags);
	if (IS_ERR(server)) {
		ret = PTR_ERR(server);
		goto put_inst;
	}
	fd = get_unused_fd_flags(umem_fd_flags(req.flags));
	if (fd < 0) {
		ret = fd;
		goto put_server;
	}

	ret = mutex_lock_killable(&umem_lock);
	if (ret)
		goto put_fd;
	ret = umem_publish(inst);
	mutex_unlock(&umem_lock);
	if (ret)
		goto put_fd;
	/* Nothing fails past publication: the registry owns our reference. */
	fd_install(fd, server);
	return fd;

put_fd:
	put_unused_fd(fd);
put_server:
	fput(server);
put_inst:
	umem_put(inst);
	return ret;
}

/* Returns the server fd of an existing instance, and its tag in @uarg. */
static long umem_ioctl_attach(struct umem_attach __user *uarg)
{
	u8 tag[UMEM_TAG_SIZE];
	struct umem_instance *inst;
	struct umem_attach req;
	struct file *server;
	int fd, ret;

	BUILD_BUG_ON(offsetof(struct umem_attach, tag) != 72);
	BUILD_BUG_ON(offsetofend(struct umem_attach, tag) != sizeof(struct umem_attach));
	if (copy_from_user(&req, uarg, offsetof(struct umem_attach, tag)))
		return -EFAULT;
	ret = umem_check_name((const char *)req.name);
	if (ret)
		return ret;
	if (req.flags & ~UMEM_FD_FLAGS)
		return -EINVAL;

	fd = get_unused_fd_flags(umem_fd_flags(req.flags));
	if (fd < 0)
		return fd;
	ret = mutex_lock_killable(&umem_lock);
	if (ret)
		goto put_fd;
	inst = umem_find_name((const char *)req.name);
	server = inst ? umem_server_open(inst, req.flags) : ERR_PTR(-ENOENT);
	if (inst)
		memcpy(tag, inst->tag, sizeof(tag));
	mutex_unlock(&umem_lock);
	if (IS_ERR(server)) {
		ret = PTR_ERR(server);
		goto put_fd;
	}
	if (copy_to_user(uarg->tag, tag, sizeof(tag))) {
		fput(server);
		ret = -EFAULT;
		goto put_fd;
	}
	fd_install(fd, server);
	return fd;

put_fd:
	put_unused_fd(fd);
	return ret;
}

static long umem_ioctl_destroy(struct umem_destroy __user *uarg)
{
	struct umem_instance *inst;
	struct umem_destroy req;
	int ret;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	ret = umem_check_name((const char *)req.name);
	if (ret)
		return ret;

	ret = mutex_lock_killable(&umem_lock);
	if (ret)
		return ret;
	inst = umem_find_name((const char *)req.name);
	if (inst)
		umem_unpublish(inst);
	mutex_unlock(&umem_lock);
	if (!inst)
		return -ENOENT;

	umem_mark_dead(inst);
	umem_put(inst);		/* the registry's reference */
	return 0;
}

static long umem_ioctl_list(struct umem_list __user *uarg)
{
	struct umem_list_entry *entries;
	struct umem_instance *inst;
	struct umem_list req;
	u32 count = 0, filled = 0;
	long ret = 0;

	BUILD_BUG_ON(offsetof(struct umem_list, count) != 12);
	BUILD_BUG_ON(offsetofend(struct umem_list, count) != sizeof(struct umem_list));
	if (copy_from_user(&req, uarg, offsetof(struct umem_list, count)))
		return -EFAULT;
	if (req.capacity > UMEM_MAX_INSTANCES)
		req.capacity = UMEM_MAX_INSTANCES;
	entries = kvcalloc(req.capacity, sizeof(*entries), GFP_KERNEL);
	if (req.capacity && !entries)
		return -ENOMEM;

	ret = mutex_lock_killable(&umem_lock);
	if (ret)
		goto out;
	list_for_each_entry(inst, &umem_instances, node) {
		if (filled < req.capacity) {
			struct umem_list_entry *e = &entries[filled++];

			strscpy(e->name, inst->name, sizeof(e->name));
			e->size = inst->size;
			e->present = atomic64_read(&inst->npresent);
			e->flags = READ_ONCE(inst->served) ? UMEM_INSTANCE_SERVED : 0;
			memcpy(e->tag, inst->tag, sizeof(e->tag));
		}
		count++;
	}
	mutex_unlock(&umem_lock);

	if (filled && copy_to_user(u64_to_user_ptr(req.entries), entries,
				   array_size(filled, sizeof(*entries))))
		ret = -EFAULT;
	else if (put_user(count, &uarg->count))
		ret = -EFAULT;
out:
	kvfree(entries);
	return ret;
}

static long umem_control_ioctl(struct file *file, unsigned int cmd,
			       unsigned long arg)
{
	struct umem_control *ctl = file->private_data;
	void __user *uarg = (void __user *)arg;

	if (cmd == UMEM_API)
		return umem_ioctl_api(ctl, uarg);
	if (READ_ONCE(ctl->state) != UMEM_CONTROL_RUNNING)
		return -EINVAL;

	switch (cmd) {
	case UMEM_CREATE:
		return umem_ioctl_create(uarg);
	case UMEM_ATTACH:
		return umem_ioctl_attach(uarg);
	case UMEM_DESTROY:
		return umem_ioctl_destroy(uarg);
	case UMEM_LIST:
		return umem_ioctl_list(uarg);
	}
	return -ENOTTY;
}

static int umem_control_open(struct inode *inode, struct file *file)
{
	struct umem_control *ctl = kzalloc(sizeof(*ctl), GFP_KERNEL);

	if (!ctl)
		return -ENOMEM;
	mutex_init(&ctl->lock);
	ctl->state = UMEM_CONTROL_WAIT_API;
	file->private_data = ctl;
	return 0;
}

static int umem_control_release(struct inode *inode, struct file *file)
{
	kfree(file->private_data);
	return 0;
}

static const struct file_operations umem_control_fops = {
	.owner		= THIS_MODULE,
	.open		= umem_control_open,
	.release	= umem_control_release,
	.unlocked_ioctl	= umem_control_ioctl,
	.compat_ioctl	= compat_ptr_ioctl,
	.llseek		= noop_llseek,
};

static struct miscdevice umem_control_dev = {
	.minor		= MISC_DYNAMIC_MINOR,
	.name		= "umem-control",
	.nodename	= "umem/control",
	.mode		= 0600,
	.fops		= &umem_control_fops,
};

static void umem_check_abi(void)
{
	BUILD_BUG_ON(sizeof(struct umem_api) != 24);
	BUILD_BUG_ON(sizeof(struct umem_create) != UMEM_CREATE_SIZE_VER0);
	BUILD_BUG_ON(sizeof(struct umem_attach) != 88);
	BUILD_BUG_ON(sizeof(struct umem_destroy) != 64);
	BUILD_BUG_ON(sizeof(struct umem_list_entry) != 104);
	BUILD_BUG_ON(sizeof(struct umem_list) != 16);
	BUILD_BUG_ON(sizeof(struct umem_fault) != 32);
	BUILD_BUG_ON(sizeof(struct umem_fill_range) != 24);
	BUILD_BUG_ON(sizeof(struct umem_fill) != 32);
	BUILD_BUG_ON(sizeof(struct umem_zero) != 40);
	BUILD_BUG_ON(sizeof(struct umem_stats) != 80);
	BUILD_BUG_ON(sizeof(struct umem_bitmap) != 24);
}

static int __init umem_init(void)
{
	int ret;

	umem_check_abi();
	ret = umem_instance_init();
	if (ret)
		return ret;
	umem_memcg_init();
	ret = alloc_chrdev_region(&umem_devt, 0, UMEM_MINOR_COUNT, "umem");
	if (ret)
		goto exit_instance;
	umem_class = umem_class_create("umem");
	if (IS_ERR(umem_class)) {
		ret = PTR_ERR(umem_class);
		goto unregister_region;
	}
	ret = misc_register(&umem_control_dev);
	if (ret)
		goto destroy_class;
	return 0;

destroy_class:
	class_destroy(umem_class);
unregister_region:
	unregister_chrdev_region(umem_devt, UMEM_MINOR_COUNT);
exit_instance:
	umem_memcg_exit();
	umem_instance_exit();
	return ret;
}

/* Every instance pins the module, so none is left here. */
static void __exit umem_exit(void)
{
	misc_deregister(&umem_control_dev);
	class_destroy(umem_class);
	unregister_chrdev_region(umem_devt, UMEM_MINOR_COUNT);
	ida_destroy(&umem_minor_ida);
	umem_memcg_exit();
	umem_instance_exit();
}

module_init(umem_init);
module_exit(umem_exit);
MODULE_DESCRIPTION("umem: memory whose pages a userspace server supplies on demand");
MODULE_AUTHOR("umem developers");
MODULE_LICENSE("GPL");
