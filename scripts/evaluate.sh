#!/usr/bin/env bash
# Detection quality on the labelled datasets (../shared/datasets or $MAD_DATASETS), through the
# exporter's own scoring path: every NAB file with a model trained on its first 15% only, scored
# by NAB's rules, and again from four more training seeds (the range is printed), then all of it
# again retrained as the history doubles (--retrain); then the SMD and ASD machines (one
# detector per machine), point-wise F1 without point-adjust and attribution, again retrained
# and again with one joint model per machine; then the single KPI series, per point and per
# event. Extra arguments go to every `mad backtest` (try --scoring band).
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
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
# NAB, printed, then from four more training seeds (how much of the score the seed decides).
nab_runs() {
  local log="$1"
  shift
  target/release/mad backtest --nab "$datasets/nab" "$@" | tee "$logs/$log"
  for seed in 1 2 3 4; do
    target/release/mad backtest --nab "$datasets/nab" --seed "$seed" "$@" > "$logs/$log-seed-$seed"
    echo "seed $seed: $(awk '$1 == "NAB" && $2 == "standard" { print $3 }' "$logs/$log-seed-$seed")"
  done
}
echo "== NAB (${datasets}/nab)"
nab_runs nab "$@"
# As a deployment retrains: again each time a file's history has doubled, leaving out the
# points scored above 1.
echo
echo "== NAB, retrained as the history grows (--retrain)"
nab_runs nab-retrain --retrain "$@"
# SMD (a row a minute) and ASD (one every five minutes), one detector per machine, logged as
# <corpus><suffix>; the rest of the arguments go to `mad backtest`.
machine_runs() {
  local suffix="$1" title="$2"
  shift 2
  for corpus in "smd 1m" "asd 5m"; do
    read -r name step <<< "$corpus"
    echo
    echo "== ${name^^}${title} (${datasets}/${name})"
    target/release/mad backtest --machines "$datasets/$name" --step "$step" "$@" | tee "$logs/$name$suffix"
  done
}
machine_runs "" "" "$@"
# The same machines retrained as their rows double (as `mad train --if-due` would).
machine_runs -retrain ", retrained as the history grows (--retrain)" --retrain "$@"
# The same machines with one joint model per machine reading all its metrics (training.joint).
machine_runs -joint ", joint model (--joint)" --joint "$@"
if compgen -G "$datasets/kpi/*.csv" > /dev/null; then
  echo
  echo "== KPI (${datasets}/kpi)"
  kpi=()
  for file in "$datasets"/kpi/*.csv; do kpi+=(--csv "$file"); done
  target/release/mad backtest "${kpi[@]}" "$@"
fi

# The one table: each corpus' summary lines, as printed above, side by side.
nab_profile() { awk -v p="$2" '$1 == "NAB" && $2 == p { print $3 }' "$logs/$1"; }
nab_profiles() {
  echo "$(nab_profile "$1" standard) / $(nab_profile "$1" reward_low_FP_rate) / $(nab_profile "$1" reward_low_FN_rate)"
}
machines() { grep '^mean best F1' "$logs/$1"; }
best_f1() { machines "$1" | sed -E 's/^mean best F1 ([0-9.]+),.*/\1/'; }
default_f1() { machines "$1" | sed -E 's/.*default threshold ([0-9.]+ \([0-9]+% of best\)).*/\1/'; }
attribution() { machines "$1" | sed -E 's/.*named in ([0-9]+ of [0-9]+) segments.*/\1/'; }
per_segment() { machines "$1" | sed -E 's/.*default threshold: ([0-9]+) of ([0-9]+) found, ([0-9]+) of ([0-9]+) detections right.*/\1\/\2; \3\/\4/'; }
train_time() { machines "$1" | sed -E 's/.*training ([0-9.]+ s) per model.*/\1/'; }
nab_seeds() {
  cat "$logs/$1" "$logs/$1"-seed-* | awk '$1 == "NAB" && $2 == "standard" { v = $3 + 0; s += v;
    if (n == 0 || v < lo) lo = v; if (n == 0 || v > hi) hi = v; n++ }
    END { printf "%.1f-%.1f (mean %.1f) over %d seeds", lo, hi, s / n, n }'
}
nab_train() { sed -nE 's/^training: ([0-9]+) models, median ([0-9.]+ s).*/median \2 (\1 models)/p' "$logs/$1"; }
echo
echo "== Summary"
printf '%-34s %-28s %-24s %s\n' "" "NAB" "SMD" "ASD"
printf '%-34s %-28s\n' "NAB standard / low FP / low FN" "$(nab_profiles nab)"
printf '%-34s %-28s\n' "NAB standard across seeds" "$(nab_seeds nab)"
printf '%-34s %-28s\n' "NAB --retrain: std / low FP / FN" "$(nab_profiles nab-retrain)"
printf '%-34s %-28s\n' "NAB --retrain across seeds" "$(nab_seeds nab-retrain)"
printf '%-34s %-28s\n' "NAB --retrain: training per model" "$(nab_train nab-retrain)"
printf '%-34s %-28s %-24s %s\n' "best F1 (no point-adjust)" "" "$(best_f1 smd)" "$(best_f1 asd)"
printf '%-34s %-28s %-24s %s\n' "F1 at the default threshold" "" "$(default_f1 smd)" "$(default_f1 asd)"
printf '%-34s %-28s %-24s %s\n' "segments found; detections right" "" "$(per_segment smd)" "$(per_segment asd)"
printf '%-34s %-28s %-24s %s\n' "attribution: labelled in top 3" "" "$(attribution smd)" "$(attribution asd)"
printf '%-34s %-28s %-24s %s\n' "training time per model" "$(nab_train nab)" "$(train_time smd)" "$(train_time asd)"
printf '%-34s %-28s %-24s %s\n' "--retrain: best F1" "" "$(best_f1 smd-retrain)" "$(best_f1 asd-retrain)"
printf '%-34s %-28s %-24s %s\n' "--retrain: F1 at default" "" "$(default_f1 smd-retrain)" "$(default_f1 asd-retrain)"
printf '%-34s %-28s %-24s %s\n' "joint model: best F1" "" "$(best_f1 smd-joint)" "$(best_f1 asd-joint)"
printf '%-34s %-28s %-24s %s\n' "joint model: F1 at default" "" "$(default_f1 smd-joint)" "$(default_f1 asd-joint)"
printf '%-34s %-28s %-24s %s\n' "joint model: training per model" "" "$(train_time smd-joint)" "$(train_time asd-joint)"
