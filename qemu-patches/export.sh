#!/bin/bash
# Export the series from a git tree made by `build.sh --tree DIR` (after a
# rebase or an edit) back into a series directory: the patches, the cover
# letter (subject and text from that directory's cover-letter.txt) and the
# series file.
#
# usage: qemu-patches/export.sh TREE [DIR]
#        TREE: the qemu-<version>+ds directory; DIR: the series directory,
#        default qemu-patches/ (the default series; qemu-patches/10.0 for
#        the 10.0 one, as `build.sh --patches` prints)
set -euo pipefail

HERE=$(cd "${2:-$(dirname "${BASH_SOURCE[0]}")}" && pwd)
TREE=${1:?usage: export.sh TREE [DIR]}
BASE=$(git -C "$TREE" rev-list --max-parents=0 HEAD)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

git -C "$TREE" -c user.name="umem developers" -c user.email=umem@example.org \
    format-patch -q --cover-letter --no-signature -o "$OUT" "$BASE"
python3 - "$OUT" "$HERE/cover-letter.txt" <<'PY'
import glob, re, sys
out, cover = sys.argv[1], open(sys.argv[2]).read()
subject, blurb = cover.split("\n\n", 1)
path = glob.glob(f"{out}/0000-*.patch")[0]
text = open(path).read()
text = re.sub(r"^From: .*\n(?: .*\n)?", "From: umem developers <umem@example.org>\n", text, count=1, flags=re.M)
text = text.replace("*** SUBJECT HERE ***", subject.strip()).replace("*** BLURB HERE ***", blurb.strip())
open(path, "w").write(text)
PY
rm -f "$HERE"/[0-9][0-9][0-9][0-9]-*.patch
cp "$OUT"/*.patch "$HERE/"
(cd "$HERE" && ls [0-9][0-9][0-9][0-9]-*.patch | grep -v '^0000-' > series)
echo "exported $(wc -l < "$HERE/series") patches from $TREE" >&2
