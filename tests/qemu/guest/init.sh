#!/bin/sh
# /init of the umem test guest: mount the basics, run the workload on the
# serial console, power off when it ends (panic=-1 covers a crash).
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "UMEMWL INIT kernel=$(uname -r)"
/workload
echo "UMEMWL DONE rc=$?"
poweroff -f
