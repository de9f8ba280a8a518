#!/bin/bash
# Build the umem test guest from Debian packages: the installed Debian kernel
# (linux-image-amd64), a busybox-static initramfs and the static workload.
# Cached under /var/cache/umem/guest/<key>; a warm cache returns at once.
#
# usage: tests/qemu/guest/build.sh     prints the directory holding
#                                      vmlinuz, initrd.img and BUILD-INFO
#
# Boot it with:
#   -kernel DIR/vmlinuz -initrd DIR/initrd.img -append "$(cat DIR/cmdline) wl_mib=192"
# The workload's parameters (wl_mib, wl_hot_mib, wl_hb_ms, wl_seconds) and
# its output format are described at the top of workload.c.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${UMEM_CACHE:-/var/cache/umem}/guest
say() { printf '[umem guest] %s\n' "$*" >&2; }
die() { printf '[umem guest] ERROR: %s\n' "$*" >&2; exit 1; }

missing=()
for p in linux-image-amd64 busybox-static gcc libc6-dev cpio; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing packages ${missing[*]}: run as root"
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get -q -y install --no-install-recommends \
        "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
fi

# The kernel that linux-image-amd64 currently depends on (the ABI number moves
# with security updates, so it is looked up, never written down).
KPKG=$(dpkg-query -W -f='${Depends}' linux-image-amd64 | grep -o 'linux-image-[^ ,]*' | head -n 1)
KREL=${KPKG#linux-image-}
VMLINUZ=/boot/vmlinuz-$KREL
[ -r "$VMLINUZ" ] || die "$VMLINUZ missing (linux-image-amd64 depends on $KPKG)"
BUSYBOX=/bin/busybox
file "$BUSYBOX" 2>/dev/null | grep -q 'statically linked' || [ ! -x /usr/bin/file ] \
    || die "$BUSYBOX is not static: install busybox-static"

KEY=$({
    echo "recipe 1"
    echo "kernel $KREL $(dpkg-query -W -f='${Version}' "$KPKG")"
    sha256sum "$VMLINUZ" | cut -d' ' -f1
    echo "busybox $(dpkg-query -W -f='${Version}' busybox-static)"
    echo "gcc $(gcc -dumpfullversion) libc $(dpkg-query -W -f='${Version}' libc6-dev)"
    cat "$HERE/workload.c" "$HERE/init.sh" "$HERE/build.sh"
} | sha256sum | cut -c1-16)
OUT=$CACHE/$KEY

if [ -f "$OUT/BUILD-INFO" ]; then
    ln -sfn "$KEY" "$CACHE/current"
    echo "$OUT"
    exit 0
fi

mkdir -p "$CACHE"
STAGE=$(mktemp -d "$CACHE/.stage.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
ROOT=$STAGE/root
mkdir -p "$ROOT"/{bin,dev,proc,sys,tmp}

say "compiling workload.c (gcc -static -O2)"
gcc -static -O2 -Wall -Wextra -Werror -o "$ROOT/workload" "$HERE/workload.c"
strip "$ROOT/workload"
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in sh mount poweroff echo cat uname sleep; do
    ln -s busybox "$ROOT/bin/$applet"
done
install -m 0755 "$HERE/init.sh" "$ROOT/init"
# The kernel opens /dev/console for init before anything is mounted.
mknod -m 600 "$ROOT/dev/console" c 5 1
mknod -m 666 "$ROOT/dev/null" c 1 3

say "packing the initramfs"
(cd "$ROOT" && find . -print0 | sort -z \
    | cpio --null --quiet -o -H newc --owner=0:0 --reproducible) \
    | gzip -9n > "$STAGE/initrd.img"
cp "$VMLINUZ" "$STAGE/vmlinuz"
echo "console=ttyS0 panic=-1 quiet" > "$STAGE/cmdline"
cat > "$STAGE/BUILD-INFO" <<EOF
key=$KEY
kernel=$KREL
busybox=$(dpkg-query -W -f='${Version}' busybox-static)
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF
rm -rf "$ROOT"
rm -rf "$OUT"
mv "$STAGE" "$OUT"
trap - EXIT
chmod 755 "$OUT"
ln -sfn "$KEY" "$CACHE/current"
say "guest ready: $OUT (kernel $KREL)"
echo "$OUT"
