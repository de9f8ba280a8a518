#!/bin/bash
# tests/kbuild/debug-kernel.sh CACHE: build (once) the debug kernel of
# `make test-kernel-debug` and print the directory it is installed in, a
# kernel root for `python3 -m tests.harness.vm --kernel-root` (boot/vmlinuz-RELEASE,
# lib/modules/RELEASE) whose build tree is DIR/build (for M= module builds).
#
# Source: Debian's linux-source-MAJOR.MINOR at the version of the kernel the
# VM boots (the newest /lib/modules with a /boot/vmlinuz, e.g. 6.1.0-57-amd64
# from linux-image-6.1.0-57-amd64 6.1.192-3), fetched with apt-get download
# (not installed).  Config: x86_64_defconfig + kvm_guest.config +
# tests/kbuild/debug-kernel.config, olddefconfig.  The result lives in
# CACHE/VERSION-SHA (SHA: the first 12 hex digits of the sha256 of the final
# .config, which also names the compiler), so a new source version, a new
# fragment or a new gcc builds a new kernel; an existing one is reused.
#
# Builds run under nice -n 19 with make -j$UMEM_KERNEL_JOBS (default 2).
set -euo pipefail
cache=$1
fragment=$(cd "$(dirname "$0")" && pwd)/debug-kernel.config
jobs=${UMEM_KERNEL_JOBS:-2}
log() { echo "debug-kernel: $*" >&2; }

# The tested kernel and its source package version.
release=$(for d in /lib/modules/*/; do d=${d%/}; r=${d##*/}
	[ -f "$d/modules.dep" ] && [ -f "/boot/vmlinuz-$r" ] && echo "$r"; done | sort -V | tail -n 1)
[ -n "$release" ] || { log "no Debian kernel in /lib/modules (apt-get install linux-image-amd64)"; exit 1; }
version=$(dpkg-query -W -f='${Version}' "linux-image-$release")
series=$(echo "$release" | cut -d. -f1-2)
pkg=linux-source-$series
mkdir -p "$cache/dl" "$cache/src"

# 1. the source package, downloaded once.
deb=$cache/dl/${pkg}_${version}_all.deb
if [ ! -f "$deb" ]; then
	log "downloading $pkg $version"
	(cd "$cache/dl" && apt-get download -q "$pkg=$version" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) ||
		{ log "apt-get download $pkg=$version failed: is the archive newer than the installed kernel? (apt-get upgrade linux-image-amd64)"; exit 1; }
fi

# 2. the source tree, at one path per series (the build trees refer to it by
# that path); re-extracted when the version changes.
src=$cache/src/$pkg
if [ "$(cat "$src/.umem-version" 2>/dev/null)" != "$version" ]; then
	log "extracting $pkg $version"
	rm -rf "$src" "$src.tmp" && mkdir -p "$src.tmp"
	dpkg-deb --fsys-tarfile "$deb" | tar -xO "./usr/src/$pkg.tar.xz" | tar -xJ -C "$src.tmp"
	mv "$src.tmp/$pkg" "$src" && rmdir "$src.tmp"
	echo "$version" >"$src/.umem-version"
fi

# 3. the config, in a scratch output tree; its hash is the key.
tmp=$(mktemp -d "$cache/.config-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
make -s -C "$src" O="$tmp" x86_64_defconfig kvm_guest.config >/dev/null
"$src/scripts/kconfig/merge_config.sh" -m -O "$tmp" "$tmp/.config" "$fragment" >/dev/null
make -s -C "$src" O="$tmp" olddefconfig >/dev/null
bad=0
while read -r line; do
	case $line in
	"# CONFIG_"*" is not set")
		opt=${line#\# }; opt=${opt%% *}
		grep -q "^$opt=" "$tmp/.config" && { log "$opt is still set"; bad=1; } ;;
	CONFIG_*) grep -qxF "$line" "$tmp/.config" || { log "$line did not stick"; bad=1; } ;;
	esac
done <"$fragment"
[ "$bad" = 0 ] || exit 1
key=$version-$(sha256sum "$tmp/.config" | cut -c1-12)
out=$cache/$key

# 4. the build, resumed if an earlier one was cut short.
if [ ! -f "$out/.umem-ready" ]; then
	if [ ! -f "$out/.config" ]; then
		rm -rf "$out" && mv "$tmp" "$out"
		make -s -C "$src" O="$out" olddefconfig >/dev/null  # the Makefile of $out, for its path
	fi
	log "building $key in $out (log: $out/build.log)"
	start=$(date +%s)
	nice -n 19 make -C "$out" -j"$jobs" bzImage modules >"$out/build.log" 2>&1 ||
		{ tail -n 30 "$out/build.log" >&2; log "build failed: $out/build.log"; exit 1; }
	krel=$(make -s -C "$out" kernelrelease)
	rm -rf "$out/umem-root"
	mkdir -p "$out/umem-root/boot"
	cp "$out/arch/x86/boot/bzImage" "$out/umem-root/boot/vmlinuz-$krel"
	cp "$out/System.map" "$out/umem-root/boot/System.map-$krel"
	make -s -C "$out" INSTALL_MOD_PATH="$out/umem-root" modules_install >/dev/null
	# The build tree, as /lib/modules/RELEASE/build is on Debian.
	ln -sfn "$out" "$out/umem-root/lib/modules/$krel/build"
	echo "$krel $(($(date +%s) - start))" >"$out/.umem-ready"
	log "built $krel in $(($(date +%s) - start)) s"
fi
echo "$out/umem-root"
