#!/usr/bin/env bash
# Fetch the ONNX Runtime shared library that `ort` loads at run time.
# The ort crate's own download cannot reach its CDN here, so take the library out of the
# official PyPI wheel instead. Idempotent: does nothing when the library is already present.
set -euo pipefail
ORT_VERSION="${ORT_VERSION:-1.31.1}"
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.ort"
lib="$dest/libonnxruntime.so.$ORT_VERSION"
if [ -s "$lib" ]; then
  exit 0
fi
mkdir -p "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download "onnxruntime==$ORT_VERSION" --no-deps --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --python-version 3.12 -d "$tmp" -q
wheel="$(ls "$tmp"/onnxruntime-*.whl)"
python3 - "$wheel" "$lib" "$ORT_VERSION" <<'PY'
import shutil, sys, zipfile
wheel, out, version = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(f"onnxruntime/capi/libonnxruntime.so.{version}") as src, open(out + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
mv "$lib.part" "$lib"
ln -sf "libonnxruntime.so.$ORT_VERSION" "$dest/libonnxruntime.so"
echo "ONNX Runtime $ORT_VERSION -> $lib"
