#!/usr/bin/env bash
# Detection quality on the labelled datasets (../shared/datasets or $MAD_DATASETS), through the
# exporter's own scoring path: every NAB file with a model trained on its first 15% only, scored
# by NAB's rules; then the SMD and ASD machines (one detector per machine), point-wise F1 without
# point-adjust and attribution; then the single KPI series, per point and per event. Extra
# arguments go to every `mad backtest` (try --scoring band).
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
echo "== NAB (${datasets}/nab)"
target/release/mad backtest --nab "$datasets/nab" "$@"
echo
echo "== SMD (${datasets}/smd)"
target/release/mad backtest --machines "$datasets/smd" --step 1m "$@"
echo
echo "== ASD (${datasets}/asd)"
target/release/mad backtest --machines "$datasets/asd" --step 5m "$@"
if compgen -G "$datasets/kpi/*.csv" > /dev/null; then
  echo
  echo "== KPI (${datasets}/kpi)"
  kpi=()
  for file in "$datasets"/kpi/*.csv; do kpi+=(--csv "$file"); done
  target/release/mad backtest "${kpi[@]}" "$@"
fi
