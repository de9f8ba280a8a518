#!/bin/bash
# tests/kbuild/chroot.sh SUITE DIR [PACKAGE...]: a Debian SUITE (trixie, sid)
# chroot at DIR with that release's compiler, perl (W=1's kernel-doc) and the
# given PACKAGEs (the pinned linux-headers-RELEASE), for building kernel/
# against its kernel.  Nothing of that release is installed on the host.
# Idempotent: the chroot is made once (DIR/.umem-ready lists its versions);
# a PACKAGE it lacks is installed into it; delete DIR to start afresh.  The
# mirror is the host's own (its apt sources).
set -euo pipefail
suite=$1 dir=$2
shift 2
base="gcc make perl libc6-dev"
log() { echo "chroot $suite: $*" >&2; }

if [ ! -f "$dir/.umem-ready" ]; then
	mirror=$(sed -n 's/^URIs: *\([^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
	[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 ~ /\/debian$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
	[ -n "$mirror" ] || { log "no Debian mirror in the host's apt sources"; exit 1; }
	command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap
	mkdir -p "$(dirname "$dir")"
	if [ ! -f "$dir.tmp/.umem-debootstrapped" ]; then
		log "debootstrap (log: $dir.log)"
		rm -rf "$dir.tmp"
		debootstrap --variant=minbase "$suite" "$dir.tmp" "$mirror" >"$dir.log" 2>&1 ||
			{ tail -n 20 "$dir.log" >&2; exit 1; }
		touch "$dir.tmp/.umem-debootstrapped"
	fi
	# The archive may be a frozen snapshot, whose Release file of a moving
	# suite (sid) is past its Valid-Until date.
	echo 'Acquire::Check-Valid-Until "false";' >"$dir.tmp/etc/apt/apt.conf.d/99umem"
	# No daemon started by a package script inside the chroot.
	printf '#!/bin/sh\nexit 101\n' >"$dir.tmp/usr/sbin/policy-rc.d"
	chmod 755 "$dir.tmp/usr/sbin/policy-rc.d"
	chroot "$dir.tmp" apt-get update -q >>"$dir.log" 2>&1 || { tail -n 20 "$dir.log" >&2; exit 1; }
	DEBIAN_FRONTEND=noninteractive chroot "$dir.tmp" apt-get install -y -q --no-install-recommends \
		$base >>"$dir.log" 2>&1 || { tail -n 20 "$dir.log" >&2; exit 1; }
	touch "$dir.tmp/.umem-ready"
	rm -rf "$dir"
	mv "$dir.tmp" "$dir"
fi
missing=
for p in "$@"; do
	chroot "$dir" dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing="$missing $p"
done
if [ -n "$missing" ]; then
	log "installing$missing"
	chroot "$dir" apt-get update -q >>"$dir.log" 2>&1
	DEBIAN_FRONTEND=noninteractive chroot "$dir" apt-get install -y -q --no-install-recommends \
		$missing >>"$dir.log" 2>&1 || { tail -n 20 "$dir.log" >&2; log "cannot install$missing (pinned version gone from the archive? update the pin in the Makefile)"; exit 1; }
fi
chroot "$dir" dpkg-query -W -f='${db:Status-Abbrev} ${Package} ${Version}\n' $base "$@" \
	'gcc-[0-9]*' 'linux-headers-*' 2>/dev/null | sed -n 's/^ii *//p' >"$dir/.umem-ready"
