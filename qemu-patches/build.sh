#!/bin/bash
# Build the patched QEMU (qemu-system-x86_64 only) from a Debian source
# package, cached under /var/cache/umem/qemu/<key>.
#
# usage: qemu-patches/build.sh            build (or reuse) and print the binary
#        qemu-patches/build.sh --key      print the cache key and exit
#        qemu-patches/build.sh --patches  print the series' directory and exit
#        qemu-patches/build.sh --tree DIR prepare a git tree (upstream source
#                                         as one commit, then the series
#                                         applied with git am) for rebasing
#
# The key hashes the Debian source version, the series (every patch and the
# series file), the configure flags and RECIPE below; a warm cache returns at
# once. Progress goes to stderr; the last line on stdout is the binary's path.
# /var/cache/umem/qemu/current points at the newest good build.
#
# Environment: UMEM_CACHE (default /var/cache/umem), UMEM_JOBS (ninja -j,
# default: number of cores), UMEM_QEMU_SERIES (default 10.2: any 10.2.x,
# from sid, with the series in qemu-patches/; 10.0: any 10.0.x, from
# trixie, with the series in qemu-patches/10.0/). A series whose
# directory qemu-patches/<series>/ exists uses it, any other
# qemu-patches/ itself.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${UMEM_CACHE:-/var/cache/umem}
CACHE=$CACHE_ROOT/qemu
SERIES_PREFIX=${UMEM_QEMU_SERIES:-10.2}
JOBS=${UMEM_JOBS:-$(nproc)}
# The patches of this series: qemu-patches/<series>/ if there is one.
PATCHES=$HERE
[ ! -d "$HERE/$SERIES_PREFIX" ] || PATCHES=$HERE/$SERIES_PREFIX
# The meson wheel that the release's configure installs into its venv
# (pythondeps.toml, [meson] installed=; checked after unpacking).
case "$SERIES_PREFIX" in
    10.0) MESON_VERSION=1.5.0 ;;
    *) MESON_VERSION=1.9.0 ;;
esac
# A private apt configuration for the deb-src index: the host's own
# sources.list stays bookworm's, so no other apt-get source ever picks sid.
APT_DIR=$CACHE_ROOT/apt
SOURCES_FILE=$APT_DIR/sources.list.d/umem-qemu-src.sources
APT_OPTS=(-o Dir::Etc::SourceList=/dev/null
          -o Dir::Etc::SourceParts="$APT_DIR/sources.list.d"
          -o Dir::State::Lists="$APT_DIR/lists"
          -o Dir::Cache="$APT_DIR/cache"
          -o APT::Sandbox::User=root)
# Bump when the recipe changes in a way that changes the output.
RECIPE=3

CONFIGURE_FLAGS=(
    --target-list=x86_64-softmmu
    --without-default-features
    --enable-kvm
    --enable-tcg
    --enable-slirp
    --enable-fdt=system
    --disable-install-blobs
    --disable-docs
    --disable-werror
)

# bookworm's packages that the build needs, listed by hand: apt-get build-dep
# would resolve trixie's build dependencies instead.
BUILD_DEPS=(
    build-essential ninja-build pkg-config dpkg-dev git
    python3 python3-venv python3-pip
    libglib2.0-dev zlib1g-dev libslirp-dev libfdt-dev flex bison
)
# Firmware at run time, from Debian's packages.
FIRMWARE_DEPS=(seabios ipxe-qemu qemu-system-data)

say() { printf '[umem qemu] %s\n' "$*" >&2; }
die() { printf '[umem qemu] ERROR: %s\n' "$*" >&2; exit 1; }

MODE=build
TREE=
case "${1:-}" in
    "") ;;
    --key) MODE=key ;;
    --patches) echo "$PATCHES"; exit 0 ;;
    --tree) MODE=tree; TREE=${2:?--tree needs a directory} ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
esac

[ "$(id -u)" = 0 ] || die "run as root (apt-get, $CACHE_ROOT)"
[ -s "$PATCHES/series" ] || die "no series file in $PATCHES"

apt_quiet() { DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=600 "$@" >&2; }

ensure_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' \
            || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing ${missing[*]}"
        apt_quiet install --no-install-recommends "${missing[@]}" \
            || die "apt-get install ${missing[*]} failed"
    fi
}

ensure_sources() {
    local want
    want=$(cat <<'EOF'
# umem: QEMU's source packages (qemu-patches/build.sh), deb-src only and in
# a private apt directory, so no binary package is ever installed from it.
# trixie has 10.0.x, sid the newer releases, trixie-backports a backport.
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie trixie-updates trixie-backports sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: trixie-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
)
    mkdir -p "$APT_DIR/sources.list.d" "$APT_DIR/lists/partial" \
        "$APT_DIR/cache/archives/partial"
    if [ "$(cat "$SOURCES_FILE" 2>/dev/null)" != "$want" ]; then
        say "writing $SOURCES_FILE"
        printf '%s\n' "$want" > "$SOURCES_FILE"
        UPDATED_SOURCES=1
    fi
}

update_sources() {
    say "apt-get update ($SOURCES_FILE only)"
    apt_quiet "${APT_OPTS[@]}" update \
        || die "apt-get update for $SOURCES_FILE failed"
}

# Highest qemu source version of the wanted series in the apt index.
source_version() {
    apt-cache "${APT_OPTS[@]}" showsrc qemu 2>/dev/null | sed -n 's/^Version: //p' \
        | grep -E "^(1:)?${SERIES_PREFIX//./\\.}\.[0-9]+\+ds" \
        | sort -V | tail -n 1 || true
}

series_patches() {
    grep -vE '^[[:space:]]*(#|$)' "$PATCHES/series"
}

cache_key() {
    {
        echo "recipe $RECIPE"
        echo "source qemu $VERSION"
        echo "meson $MESON_VERSION"
        echo "configure ${CONFIGURE_FLAGS[*]}"
        echo "series"
        cat "$PATCHES/series"
        local p
        for p in $(series_patches); do
            echo "patch $p"
            cat "$PATCHES/$p"
        done
    } | sha256sum | cut -c1-16
}

# --- find the source version and the key ---------------------------------
ensure_packages dpkg-dev
UPDATED_SOURCES=0
ensure_sources
VERSION=$(source_version)
if [ "$UPDATED_SOURCES" = 1 ] || [ -z "$VERSION" ]; then
    update_sources
    VERSION=$(source_version)
fi
[ -n "$VERSION" ] || die "no qemu $SERIES_PREFIX.x source package in the index" \
    "(apt-cache showsrc qemu lists: $(apt-cache "${APT_OPTS[@]}" showsrc qemu | sed -n 's/^Version: //p' | tr '\n' ' '))"
KEY=$(cache_key)
OUT=$CACHE/$KEY
BIN=$OUT/bin/qemu-system-x86_64

if [ "$MODE" = key ]; then
    echo "$KEY"
    exit 0
fi

mkdir -p "$CACHE"
if [ "$MODE" = build ] && [ -x "$BIN" ] && [ -f "$OUT/BUILD-INFO" ]; then
    say "cached: $OUT (qemu $VERSION)"
    ln -sfn "$KEY" "$CACHE/current"
    echo "$BIN"
    exit 0
fi

# One build at a time; a second caller waits and then finds the cache warm.
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
    say "another build holds $CACHE/.lock; waiting"
    flock 9
    if [ "$MODE" = build ] && [ -x "$BIN" ] && [ -f "$OUT/BUILD-INFO" ]; then
        ln -sfn "$KEY" "$CACHE/current"
        echo "$BIN"
        exit 0
    fi
fi

START=$(date +%s)
ensure_packages "${BUILD_DEPS[@]}" "${FIRMWARE_DEPS[@]}"

# --- fetch and prepare the source ----------------------------------------
if [ "$MODE" = tree ]; then
    WORK=$(realpath -m "$TREE")
    [ ! -e "$WORK" ] || die "$WORK exists; give a new directory"
else
    WORK=$CACHE/$KEY.work
    rm -rf "$WORK"
fi
mkdir -p "$WORK"
say "apt-get source qemu=$VERSION into $WORK"
# The _apt sandbox user cannot write here; the download still works as root.
(cd "$WORK" && apt-get "${APT_OPTS[@]}" -q source "qemu=$VERSION" \
    >"$WORK/apt-source.log" 2>&1) \
    || { cat "$WORK/apt-source.log" >&2; die "apt-get source qemu=$VERSION failed"; }
SRC=$(find "$WORK" -mindepth 1 -maxdepth 1 -type d -name 'qemu-*' | head -n 1)
[ -n "$SRC" ] && [ -f "$SRC/VERSION" ] || die "no unpacked source in $WORK"
UPSTREAM=$(cat "$SRC/VERSION")
case "$UPSTREAM" in
    "$SERIES_PREFIX".*) say "upstream version $UPSTREAM" ;;
    *) die "source is QEMU $UPSTREAM, not $SERIES_PREFIX.x" ;;
esac

# Debian's skip-unpack-edk2-blobs.patch (applied by dpkg-source): the +ds
# tarball has no edk2 blobs to unpack. Apply the same change if it is gone.
if ! grep -q '^if unpack_edk2_blobs and false' "$SRC/pc-bios/meson.build"; then
    say "applying the edk2 blob skip"
    sed -i 's/^if unpack_edk2_blobs$/if unpack_edk2_blobs and false/' \
        "$SRC/pc-bios/meson.build"
    grep -q '^if unpack_edk2_blobs and false' "$SRC/pc-bios/meson.build" \
        || die "cannot disable edk2 blob unpacking in pc-bios/meson.build"
fi

# The +ds tarball lacks the meson wheel that configure installs into its venv.
WANT_MESON=$(sed -n '/^\[meson\]/,/^\[/s/^meson = .*installed = "\([^"]*\)".*/\1/p' \
    "$SRC/pythondeps.toml" 2>/dev/null | head -n 1)
[ -z "$WANT_MESON" ] || [ "$WANT_MESON" = "$MESON_VERSION" ] \
    || die "QEMU $UPSTREAM wants meson $WANT_MESON, build.sh has $MESON_VERSION for $SERIES_PREFIX"
WHEELS=$CACHE_ROOT/downloads
if ! ls "$WHEELS"/meson-"$MESON_VERSION"-*.whl >/dev/null 2>&1; then
    say "pip download meson==$MESON_VERSION"
    mkdir -p "$WHEELS"
    /usr/bin/python3 -m pip download -q --no-deps --only-binary=:all: \
        -d "$WHEELS" "meson==$MESON_VERSION" >&2 \
        || die "pip download meson==$MESON_VERSION failed"
fi
mkdir -p "$SRC/python/wheels"
cp "$WHEELS"/meson-"$MESON_VERSION"-*.whl "$SRC/python/wheels/"

# --- apply the series in a throwaway git repository ----------------------
say "applying $(series_patches | wc -l) patches with git am -3"
GIT=(git -C "$SRC" -c user.name="umem build" -c user.email=umem@example.org
     -c commit.gpgsign=false)
"${GIT[@]}" init -q
"${GIT[@]}" add -A -f .
"${GIT[@]}" commit -q -m "qemu $VERSION (Debian source package)"
for p in $(series_patches); do
    [ -f "$PATCHES/$p" ] || die "series names $p, which is missing"
    if ! "${GIT[@]}" am -q -3 "$PATCHES/$p" >&2; then
        "${GIT[@]}" am --abort || true
        die "$p does not apply to qemu $VERSION: rebase the series (docs/qemu.md)"
    fi
    say "  applied $p"
done

if [ "$MODE" = tree ]; then
    say "tree ready: $SRC (base commit: qemu $VERSION)"
    echo "$SRC"
    exit 0
fi

# --- configure and build --------------------------------------------------
say "configure ${CONFIGURE_FLAGS[*]}"
mkdir -p "$SRC/build"
(cd "$SRC/build" && ../configure --python=/usr/bin/python3 \
    "${CONFIGURE_FLAGS[@]}" >"$WORK/configure.log" 2>&1) \
    || { tail -n 30 "$WORK/configure.log" >&2; die "configure failed (log: $WORK/configure.log)"; }
say "ninja -j$JOBS qemu-system-x86_64 (4-5 minutes on 2 idle cores, about 9 under load)"
BUILD_START=$(date +%s)
if ! ninja -C "$SRC/build" -j"$JOBS" qemu-system-x86_64 >"$WORK/ninja.log" 2>&1; then
    grep -E -B2 -A8 'FAILED|error:' "$WORK/ninja.log" | tail -n 40 >&2 || true
    die "build failed (log: $WORK/ninja.log)"
fi
BUILD_SECS=$(( $(date +%s) - BUILD_START ))

# --- install into the cache -------------------------------------------------
STAGE=$CACHE/$KEY.stage
rm -rf "$STAGE"
mkdir -p "$STAGE/bin" "$STAGE/share/qemu"
cp "$SRC/build/qemu-system-x86_64" "$STAGE/bin/qemu-system-x86_64.debug"
strip -o "$STAGE/bin/qemu-system-x86_64" "$SRC/build/qemu-system-x86_64"
# Firmware: the binary is relocatable, so <key>/share/qemu is its default
# data directory; pass -L <key>/share/qemu to be explicit. Earlier packages
# win: seabios, ipxe-qemu, then qemu-system-data.
for d in /usr/share/seabios /usr/lib/ipxe/qemu /usr/share/qemu; do
    for f in "$d"/*; do
        [ -e "$STAGE/share/qemu/$(basename "$f")" ] || ln -s "$f" "$STAGE/share/qemu/"
    done
done
for f in bios-256k.bin efi-virtio.rom kvmvapic.bin linuxboot_dma.bin keymaps; do
    [ -e "$STAGE/share/qemu/$f" ] || die "firmware $f missing from $STAGE/share/qemu"
done
cat >"$STAGE/BUILD-INFO" <<EOF
key=$KEY
source=qemu $VERSION
upstream=$UPSTREAM
series=$(series_patches | tr '\n' ' ')
configure=${CONFIGURE_FLAGS[*]}
meson=$MESON_VERSION
recipe=$RECIPE
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
build_seconds=$BUILD_SECS
total_seconds=$(( $(date +%s) - START ))
EOF
"$STAGE/bin/qemu-system-x86_64" --version >&2 \
    || die "the built binary does not run"
rm -rf "$OUT"
mv "$STAGE" "$OUT"
ln -sfn "$KEY" "$CACHE/current"
rm -rf "$WORK"
say "built qemu $VERSION + series in $(( $(date +%s) - START )) s -> $OUT"
echo "$BIN"
