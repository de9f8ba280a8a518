#!/bin/bash
# tests/kbuild/chroot.sh SUITE DIR: a Debian SUITE (trixie, sid) chroot at DIR
# with the compiler and the kernel headers of that release, for building
# kernel/ against its kernel (make kmod-newer).  Nothing of that release is
# installed on the host.  Idempotent: DIR/.umem-ready records what was
# installed; a ready chroot is left as it is (delete DIR to refresh it).
# The mirror is the host's own (its apt sources), so that no host name is
# written here.
set -euo pipefail
suite=$1 dir=$2
stamp=$dir/.umem-ready
packages="gcc make perl linux-headers-amd64 libc6-dev"

if [ -f "$stamp" ]; then
	exit 0
fi
mirror=$(sed -n 's/^URIs: *\([^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 ~ /\/debian$/ {print $2; exit}' /etc/apt/sources.list)
[ -n "$mirror" ] || { echo "chroot.sh: no Debian mirror in the host's apt sources" >&2; exit 1; }
command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap

mkdir -p "$(dirname "$dir")"
if [ ! -f "$dir.tmp/.umem-debootstrapped" ]; then
	rm -rf "$dir.tmp"
	debootstrap --variant=minbase "$suite" "$dir.tmp" "$mirror" >"$dir.tmp.log" 2>&1 ||
		{ tail -n 20 "$dir.tmp.log" >&2; exit 1; }
	touch "$dir.tmp/.umem-debootstrapped"
fi
# The archive may be a frozen snapshot, whose Release files of a moving
# suite (sid) are past their Valid-Until date.
echo 'Acquire::Check-Valid-Until "false";' >"$dir.tmp/etc/apt/apt.conf.d/99umem"
# No daemons started by package scripts inside the chroot.
printf '#!/bin/sh\nexit 101\n' >"$dir.tmp/usr/sbin/policy-rc.d"
chmod 755 "$dir.tmp/usr/sbin/policy-rc.d"
chroot "$dir.tmp" apt-get update -q >>"$dir.tmp.log" 2>&1
DEBIAN_FRONTEND=noninteractive chroot "$dir.tmp" apt-get install -y -q --no-install-recommends \
	$packages >>"$dir.tmp.log" 2>&1 || { tail -n 20 "$dir.tmp.log" >&2; exit 1; }
chroot "$dir.tmp" dpkg-query -W -f='${Package} ${Version}\n' $packages \
	'linux-headers-*-amd64' 'linux-kbuild-*' 'gcc-[0-9]*' >"$dir.tmp/.umem-ready"
rm -rf "$dir"
mv "$dir.tmp" "$dir"
mv "$dir.tmp.log" "$dir.log"
cat "$stamp"
