#!/bin/bash
# tests/kbuild/debian-kernel.sh CHROOT RELEASE OUT: unpack Debian's
# linux-image-RELEASE, fetched with apt-get download inside CHROOT (a chroot
# of its release, tests/kbuild/chroot.sh), into OUT as a kernel root for
# `python3 -m tests.harness.vm --kernel-root OUT`: OUT/boot/vmlinuz-RELEASE and
# OUT/lib/modules/RELEASE with modules.dep made by the host's depmod (the
# guest runs the host's kmod).  Nothing is installed, on the host or in the
# chroot.  Idempotent: OUT/.umem-ready names the package version.
set -euo pipefail
root=$1 release=$2 out=$3
[ -f "$out/.umem-ready" ] && exit 0
pkg=linux-image-$release
rm -rf "$root/tmp/umem-kernel" "$out.tmp"
mkdir -p "$root/tmp/umem-kernel" "$out.tmp"
# Newer releases split the image: linux-image-RELEASE depends on
# linux-binary-RELEASE (vmlinuz), linux-modules-RELEASE and friends.
parts=$(chroot "$root" apt-cache show "$pkg" | sed -n 's/^Depends: //p' | head -n 1 | tr ',' '\n' |
	sed -n "s/^ *\(linux-[a-z-]*-$release\)\b.*/\1/p" | sort -u | tr '\n' ' ')
chroot "$root" sh -c "cd /tmp/umem-kernel && apt-get download -qq $pkg $parts" 2>&1 |
	grep -v '^W: Download is performed unsandboxed' >&2 || true
for deb in "$root"/tmp/umem-kernel/*.deb; do
	dpkg-deb -x "$deb" "$out.tmp"
done
deb=$(ls "$root"/tmp/umem-kernel/"${pkg}"_*.deb)
# Merged /usr: newer packages ship usr/lib/modules, and the image as
# usr/lib/modules/RELEASE/vmlinuz (postinst links it into /boot).
if [ -d "$out.tmp/usr/lib/modules" ]; then
	mkdir -p "$out.tmp/lib/modules"
	cp -a "$out.tmp/usr/lib/modules/." "$out.tmp/lib/modules/"
	rm -rf "$out.tmp/usr/lib/modules"
fi
if [ ! -e "$out.tmp/boot/vmlinuz-$release" ] && [ -f "$out.tmp/lib/modules/$release/vmlinuz" ]; then
	mkdir -p "$out.tmp/boot"
	mv "$out.tmp/lib/modules/$release/vmlinuz" "$out.tmp/boot/vmlinuz-$release"
fi
[ -f "$out.tmp/boot/vmlinuz-$release" ] || { echo "no boot/vmlinuz-$release in $deb" >&2; exit 1; }
depmod -b "$out.tmp" "$release"
dpkg-deb -f "$deb" Package Version | tr '\n' ' ' >"$out.tmp/.umem-ready"
rm -rf "$out" "$root/tmp/umem-kernel"
mv "$out.tmp" "$out"
