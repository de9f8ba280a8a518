#!/bin/sh
# PID 1 of the umem test VM, run by busybox sh.  tests/vm/initramfs.py puts it
# in the initramfs as /init; per-run settings come from /etc/umem-vm/run.conf,
# appended by tests/vm/qemu.py as a second archive:
#   UMEM_VM_CHECKOUT, UMEM_VM_CHECKOUT_CACHE, UMEM_VM_NET, UMEM_VM_UDEV,
#   UMEM_VM_STTY, UMEM_VM_MODULES, UMEM_VM_RELEASE (--kernel-root), and
#   "$@" = env(1) arguments: NAME=VALUE... COMMAND ARG...
#
# Stage "boot" (in the initramfs) loads the 9p modules, builds the root (the
# host root read-only under a tmpfs overlay, the checkout read-write at its
# host path) and switch_roots into it, so that PID 1 and the command share
# one root: udevadm and friends refuse to work "in a chroot".  Stage "run"
# (PID 1 in the new root, with a copy of busybox under /run/umem-vm) sets up
# the network and udev, runs the command and reports its exit status.
#
# Channels: ttyS0 is the kernel console (our own messages too); ttyS1 carries
# the command's stdout and stderr; the virtio-serial port org.umem.vm.status
# carries the exit status, and the host acknowledges it, so we never power
# off before the host has it.

STATE=/run/umem-vm  # in the new root
BB=$STATE/busybox

die() {
	echo "umem-vm: setup failed: $*"
	if [ -x "$BB" ]; then $BB reboot -f; else reboot -f; fi
}

boot() {
	/bin/mount -t proc -o nosuid,nodev,noexec proc /proc
	export PATH=/bin
	mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
	mount -t devtmpfs -o nosuid devtmpfs /dev
	echo "umem-vm: init started"
	. /etc/umem-vm/run.conf || die "no run.conf"

	while read -r mod; do
		insmod "$mod" || die "insmod $mod"
	done </etc/umem-vm/modules

	p9="trans=virtio,version=9p2000.L,msize=512000"
	R=/mnt/root
	# The host root, read-only, under a tmpfs overlay: every path is
	# writable and every write vanishes with the VM.
	mount -t 9p -o "ro,cache=loose,$p9" hostroot /mnt/host || die "mount host root"
	mount -t tmpfs -o mode=0755 tmpfs /mnt/rw
	mkdir /mnt/rw/upper /mnt/rw/work
	mount -t overlay -o "lowerdir=/mnt/host,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work" \
		overlay "$R" || die "mount overlay"

	mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
	mount -t sysfs -o nosuid,nodev,noexec sysfs "$R/sys"
	mount -t devtmpfs -o nosuid devtmpfs "$R/dev"
	mkdir -p "$R/dev/pts" "$R/dev/shm" "$R/dev/hugepages" "$R/dev/mqueue"
	mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts "$R/dev/pts"
	mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs "$R/dev/shm"
	mount -t hugetlbfs hugetlbfs "$R/dev/hugepages"
	mount -t mqueue mqueue "$R/dev/mqueue"
	ln -sf /proc/self/fd "$R/dev/fd"
	ln -sf /proc/self/fd/0 "$R/dev/stdin"
	ln -sf /proc/self/fd/1 "$R/dev/stdout"
	ln -sf /proc/self/fd/2 "$R/dev/stderr"
	mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
	mount -t debugfs -o nosuid,nodev,noexec debugfs "$R/sys/kernel/debug"
	# Fresh, empty scratch space: the host's /tmp and /run must not leak
	# in.  /var/cache stays the host's (the caches under /var/cache/umem).
	for d in /tmp /var/tmp /run /var/lib/udev; do
		mkdir -p "$R$d"
		mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs "$R$d"
	done
	chmod 0755 "$R/run" "$R/var/lib/udev"
	# The checkout, read-write, at its host path; mounted last so that a
	# checkout under /tmp is not hidden by the tmpfs above.
	mkdir -p "$R$UMEM_VM_CHECKOUT"
	mount -t 9p -o "rw,cache=$UMEM_VM_CHECKOUT_CACHE,$p9" checkout "$R$UMEM_VM_CHECKOUT" \
		|| die "mount checkout"

	# A kernel that is not the host's (--kernel-root): its modules, where
	# modprobe looks for them.
	if [ -n "$UMEM_VM_MODULES" ]; then
		mkdir -p "$R/lib/modules/$UMEM_VM_RELEASE"
		mount -o bind "$R$UMEM_VM_MODULES" "$R/lib/modules/$UMEM_VM_RELEASE" ||
			die "bind $UMEM_VM_MODULES"
	fi

	mkdir -p "$R$STATE"
	cp /bin/busybox /init "$R$STATE/"
	cp -r /etc/umem-vm/. "$R$STATE/"
	umount /proc /sys /dev
	exec switch_root "$R" "$BB" sh "$STATE/init" run
}

run() {
	# busybox sh runs its own applets before anything on PATH: the host's
	# tools (kmod's modprobe, GNU date, udevadm) are called by full path.
	export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
	. "$STATE/run.conf"
	open_status_port || die "no virtio-serial port org.umem.vm.status"
	# The host's clock, to the nanosecond: the RTC gave us whole seconds.
	echo "time?" >&4
	read -r -t 10 _ now <&4 && /bin/date -s "@$now" >/dev/null
	$BB hostname umem-vm
	$BB ip link set lo up
	if [ "$UMEM_VM_NET" = 1 ]; then
		/sbin/modprobe virtio_net || die "modprobe virtio_net"
		$BB ip addr add 10.0.2.15/24 dev eth0 && $BB ip link set eth0 up &&
			$BB ip route add default via 10.0.2.2 || die "configure eth0"
		rm -f /etc/resolv.conf
		echo "nameserver 10.0.2.3" >/etc/resolv.conf
	fi
	if [ "$UMEM_VM_UDEV" = 1 ]; then
		mkdir -p /run/udev/rules.d
		cp "$STATE"/rules.d/* /run/udev/rules.d/ || die "copy udev rules"
		/lib/systemd/systemd-udevd --daemon 4>&- || die "start systemd-udevd"
		/bin/udevadm trigger --action=add || die "udevadm trigger"
		/bin/udevadm settle --timeout=120 || die "udevadm settle"
	fi

	# The command: cwd = checkout, stdin /dev/null, output on ttyS1.
	$BB stty -F /dev/ttyS1 raw -echo $UMEM_VM_STTY
	echo "umem-vm: running command"
	/usr/bin/env -i --chdir="$UMEM_VM_CHECKOUT" "$@" </dev/null >/dev/ttyS1 2>&1 4>&-
	rc=$?

	# Kill what the command left running, wait until only kernel threads
	# remain, then wait for ttyS1 to drain (stty sets its mode with
	# TCSADRAIN).
	kill -9 -1 2>/dev/null
	i=0
	while [ $i -lt 100 ]; do
		alive=
		for p in /proc/[0-9]*; do
			[ "${p#/proc/}" = 1 ] && continue
			[ -e "$p/exe" ] && alive=1 && break  # kernel threads have no exe
		done
		[ -z "$alive" ] && break
		$BB sleep 0.05
		i=$((i + 1))
	done
	$BB stty -F /dev/ttyS1 raw
	$BB sync
	$BB umount "$UMEM_VM_CHECKOUT" 2>/dev/null

	echo "status $rc" >&4
	read -r -t 30 _ack <&4
	$BB reboot -f
}

# Open the virtio-serial port org.umem.vm.status as fd 4 (virtio_console adds
# ports asynchronously: wait for it).
open_status_port() {
	i=0
	while [ $i -lt 200 ]; do
		for port in /sys/class/virtio-ports/*; do
			[ "$($BB cat "$port/name" 2>/dev/null)" = org.umem.vm.status ] || continue
			exec 4<>"/dev/${port##*/}" && return 0
		done
		$BB sleep 0.05
		i=$((i + 1))
	done
	return 1
}

if [ "$1" = run ]; then
	run
else
	boot
fi
