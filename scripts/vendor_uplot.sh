#!/usr/bin/env bash
# Re-vendor uPlot (https://github.com/leeoniya/uPlot, MIT) into the GRADIENTS tab's static folder from the npm
# registry: its built files and licence are committed, so running or testing the project needs no Node.
#   scripts/vendor_uplot.sh            # the version below
#   scripts/vendor_uplot.sh 1.6.33     # another one
set -euo pipefail
version="${1:-1.6.32}"
dest="$(cd "$(dirname "$0")/.." && pwd)/src/gradlab_tensorboard/static"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "uplot@$version" >/dev/null && tar xzf uplot-*.tgz)
cp "$tmp/package/dist/uPlot.iife.min.js" "$tmp/package/dist/uPlot.min.css" "$dest/"
cp "$tmp/package/LICENSE" "$dest/uPlot.LICENSE"
echo "uPlot $version -> $dest"
