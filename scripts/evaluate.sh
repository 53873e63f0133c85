#!/usr/bin/env bash
# Detection quality on the labelled datasets (../shared/datasets or $MAD_DATASETS): every NAB
# file replayed through the exporter's scoring path with a model trained on its first 15% only,
# scored by NAB's rules. Extra arguments go to `mad backtest` (try --scoring raw, --out DIR).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
datasets="${MAD_DATASETS:-}"
if [ -z "$datasets" ]; then
  for candidate in "$root/../shared/datasets" /work/shared/datasets; do
    if [ -d "$candidate/nab" ]; then datasets="$candidate"; break; fi
  done
fi
if [ -z "$datasets" ] || [ ! -d "$datasets/nab" ]; then
  echo "error: labelled datasets not found; set MAD_DATASETS to the folder holding nab/" >&2
  exit 2
fi
[ -e .ort/libonnxruntime.so ] || scripts/fetch-onnxruntime.sh
cargo build --release --quiet --bin mad
exec target/release/mad backtest --nab "$datasets/nab" "$@"
