// SPDX-License-Identifier: GPL-2.0
/*
 * An instance's read-only attributes in sysfs, for anyone who wants to
 * watch it without being its server (umemd stats during a pull):
 *
 *   /sys/class/umem/umem!<name>/stats/<field>  struct umem_stats, one each
 *   /sys/class/umem/umem!<name>/served         1 while a server fd is open
 *   /sys/class/umem/umem!<name>/tag            the migration tag, hex (root)
 *
 * The attributes are removed by device_del() in UMEM_DESTROY, which waits
 * for every running ->show(), before the registry drops its reference: a
 * ->show() always sees a live instance.
 */
#include <linux/device.h>
#include <linux/sysfs.h>

#include "umem.h"

#define UMEM_STAT_ATTR(field)						\
static ssize_t field##_show(struct device *dev,				\
			    struct device_attribute *attr, char *buf)	\
{									\
	struct umem_stats stats;					\
									\
	umem_read_stats(dev_get_drvdata(dev), &stats);			\
	return sysfs_emit(buf, "%llu\n", stats.field);			\
}									\
static DEVICE_ATTR_RO(field)

UMEM_STAT_ATTR(size);
UMEM_STAT_ATTR(pages);
UMEM_STAT_ATTR(present);
UMEM_STAT_ATTR(requested);
UMEM_STAT_ATTR(faults);
UMEM_STAT_ATTR(waiters);
UMEM_STAT_ATTR(wait_ns);
UMEM_STAT_ATTR(filled);
UMEM_STAT_ATTR(zeroed);
UMEM_STAT_ATTR(skipped);

static struct attribute *umem_stats_attrs[] = {
	&dev_attr_size.attr,
	&dev_attr_pages.attr,
	&dev_attr_present.attr,
	&dev_attr_requested.attr,
	&dev_attr_faults.attr,
	&dev_attr_waiters.attr,
	&dev_attr_wait_ns.attr,
	&dev_attr_filled.attr,
	&dev_attr_zeroed.attr,
	&dev_attr_skipped.attr,
	NULL,
};

static const struct attribute_group umem_stats_group = {
	.name	= "stats",
	.attrs	= umem_stats_attrs,
};

static ssize_t served_show(struct device *dev, struct device_attribute *attr,
			   char *buf)
{
	struct umem_instance *inst = dev_get_drvdata(dev);

	return sysfs_emit(buf, "%d\n", READ_ONCE(inst->served));
}
static DEVICE_ATTR_RO(served);

/* The tag may be what a migration is recognised by: root only. */
static ssize_t tag_show(struct device *dev, struct device_attribute *attr,
			char *buf)
{
	struct umem_instance *inst = dev_get_drvdata(dev);

	return sysfs_emit(buf, "%*phN\n", UMEM_TAG_SIZE, inst->tag);
}
static DEVICE_ATTR_ADMIN_RO(tag);

static struct attribute *umem_instance_attrs[] = {
	&dev_attr_served.attr,
	&dev_attr_tag.attr,
	NULL,
};

static const struct attribute_group umem_instance_group = {
	.attrs	= umem_instance_attrs,
};

const struct attribute_group *umem_instance_groups[] = {
	&umem_instance_group,
	&umem_stats_group,
	NULL,
};
