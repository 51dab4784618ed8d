#!/usr/bin/env bash
# Fetch Jane Austen's six novels (Debian package r-cran-janeaustenr) for jaxquant.models.austen.
#   bash scripts/fetch_austen.sh            # into ${JAXQUANT_AUSTEN_DIR:-~/.cache/jaxquant/austen}
#   bash scripts/fetch_austen.sh DIR        # into DIR (then set JAXQUANT_AUSTEN_DIR=DIR to read it)
# The package is downloaded, not installed (installing it pulls in R), and only its R lazy-load
# database (data/Rdata.rdb + Rdata.rdx, ~1.6 MB) and DESCRIPTION are kept. Needs apt-get and dpkg-deb.
set -euo pipefail
dest="${1:-${JAXQUANT_AUSTEN_DIR:-$HOME/.cache/jaxquant/austen}}"
package=r-cran-janeaustenr
if [ -s "$dest/Rdata.rdb" ] && [ -s "$dest/Rdata.rdx" ]; then
  echo "Austen's novels already in $dest"
  exit 0
fi
for tool in apt-get dpkg-deb; do
  command -v "$tool" >/dev/null 2>&1 || { echo "fetch_austen: needs $tool (Debian/Ubuntu)" >&2; exit 1; }
done
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# a fresh machine may have no package lists yet
(cd "$tmp" && apt-get download -qq "$package" >/dev/null 2>&1) \
  || { apt-get update -qq >/dev/null && (cd "$tmp" && apt-get download -qq "$package" >/dev/null); }
dpkg-deb -x "$tmp"/"$package"_*.deb "$tmp/root"
src="$tmp/root/usr/lib/R/site-library/janeaustenr"
mkdir -p "$dest"
cp "$src/DESCRIPTION" "$dest/"
# the data files last, Rdata.rdb after Rdata.rdx: a half-finished copy is never taken as complete
cp "$src/data/Rdata.rdx" "$dest/Rdata.rdx.part" && mv "$dest/Rdata.rdx.part" "$dest/Rdata.rdx"
cp "$src/data/Rdata.rdb" "$dest/Rdata.rdb.part" && mv "$dest/Rdata.rdb.part" "$dest/Rdata.rdb"
echo "Austen's novels in $dest ($(sed -n 's/^Version: //p' "$dest/DESCRIPTION"))"
