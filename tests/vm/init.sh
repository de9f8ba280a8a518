#!/bin/sh
# PID 1 of the umem test VM, run by busybox sh from the initramfs built by
# tests/vm/initramfs.py.  Per-run settings come from /etc/umem-vm/run.conf,
# appended as a second archive by tests/vm/qemu.py: UMEM_VM_CHECKOUT,
# UMEM_VM_CHECKOUT_CACHE, UMEM_VM_NET, UMEM_VM_UDEV, UMEM_VM_STTY and
# "$@" = the env(1) arguments: NAME=VALUE... COMMAND ARG...
#
# Channels: ttyS0 is the kernel console (our own messages too), ttyS1 carries
# the command's stdout and stderr, and the virtio-serial port
# org.umem.vm.status carries the exit status (the host acknowledges it, so we
# never power off before the host has it).

/bin/mount -t proc -o nosuid,nodev,noexec proc /proc
export PATH=/bin
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid devtmpfs /dev
echo "umem-vm: init started"

die() {
	echo "umem-vm: setup failed: $*"
	reboot -f
}

. /etc/umem-vm/run.conf || die "no run.conf"

while read -r mod; do
	insmod "$mod" || die "insmod $mod"
done </etc/umem-vm/modules

P9="trans=virtio,version=9p2000.L,msize=512000"
H=/mnt/host
R=/mnt/root

# The host root, read-only, under a tmpfs overlay: every path is writable and
# every write vanishes with the VM.
mount -t 9p -o "ro,cache=loose,$P9" hostroot "$H" || die "mount host root"
mount -t tmpfs -o mode=0755 tmpfs /mnt/rw
mkdir /mnt/rw/upper /mnt/rw/work
mount -t overlay -o "lowerdir=$H,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work" \
	overlay "$R" || die "mount overlay"

mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs "$R/sys"
mount -t devtmpfs -o nosuid devtmpfs "$R/dev"
mkdir -p "$R/dev/pts" "$R/dev/shm" "$R/dev/hugepages" "$R/dev/mqueue"
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts "$R/dev/pts"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs "$R/dev/shm"
mount -t hugetlbfs hugetlbfs "$R/dev/hugepages"
mount -t mqueue mqueue "$R/dev/mqueue"
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"
ln -s /proc/self/fd/2 "$R/dev/stderr"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
mount -t debugfs -o nosuid,nodev,noexec debugfs "$R/sys/kernel/debug"
# Fresh, empty scratch space (the host's /tmp and /run must not leak in).
# /var/cache stays the host's: the caches under /var/cache/umem are read there.
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs "$R/tmp"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs "$R/var/tmp"
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs "$R/run"
mkdir -p "$R/var/lib/udev" "$R/run/lock"
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs "$R/var/lib/udev"
# The checkout, read-write, at its host path (mounted last so that a checkout
# under /tmp is not hidden by the tmpfs above).
mkdir -p "$R$UMEM_VM_CHECKOUT"
mount -t 9p -o "rw,cache=$UMEM_VM_CHECKOUT_CACHE,$P9" checkout "$R$UMEM_VM_CHECKOUT" \
	|| die "mount checkout"

hostname umem-vm
ip link set lo up
if [ "$UMEM_VM_NET" = 1 ]; then
	chroot "$R" modprobe virtio_net || die "modprobe virtio_net"
	ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up &&
		ip route add default via 10.0.2.2 || die "configure eth0"
	rm -f "$R/etc/resolv.conf"
	echo "nameserver 10.0.2.3" >"$R/etc/resolv.conf"
fi

if [ "$UMEM_VM_UDEV" = 1 ]; then
	mkdir -p "$R/run/udev/rules.d"
	cp /etc/umem-vm/rules.d/* "$R/run/udev/rules.d/" || die "copy udev rules"
	chroot "$R" /lib/systemd/systemd-udevd --daemon || die "start systemd-udevd"
	chroot "$R" udevadm trigger --action=add || die "udevadm trigger"
	chroot "$R" udevadm settle --timeout=120 || die "udevadm settle"
fi

# Run the command: cwd = checkout, stdin /dev/null, output on ttyS1.
stty -F /dev/ttyS1 raw -echo $UMEM_VM_STTY
echo "umem-vm: running command"
chroot "$R" /usr/bin/env -i --chdir="$UMEM_VM_CHECKOUT" "$@" \
	</dev/null >/dev/ttyS1 2>&1
rc=$?

# Kill what the command left running, wait until only kernel threads remain,
# then wait for ttyS1 to drain (stty sets its mode with TCSADRAIN).
kill -9 -1 2>/dev/null
i=0
while [ $i -lt 100 ]; do
	alive=
	for p in /proc/[0-9]*; do
		[ "${p#/proc/}" = 1 ] && continue
		[ -e "$p/exe" ] && alive=1 && break  # kernel threads have no exe
	done
	[ -z "$alive" ] && break
	sleep 0.05
	i=$((i + 1))
done
stty -F /dev/ttyS1 raw
sync
umount "$R$UMEM_VM_CHECKOUT" 2>/dev/null

# virtio_console adds ports asynchronously: wait for ours.
i=0
while [ $i -lt 200 ]; do
	for port in /sys/class/virtio-ports/*; do
		[ "$(cat "$port/name" 2>/dev/null)" = org.umem.vm.status ] || continue
		exec 4<>"/dev/${port##*/}"
		echo "$rc" >&4
		read -r -t 30 _ack <&4
		reboot -f
	done
	sleep 0.05
	i=$((i + 1))
done
echo "umem-vm: no virtio-serial port org.umem.vm.status"
reboot -f
