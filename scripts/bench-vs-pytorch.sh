#!/usr/bin/env bash
# MAD's training speed against PyTorch, both measured here and now: issue 5's reference
# configuration (20,160 points, window 64, hidden 32, batch 64, Adam 1e-3, 5 epochs, one
# thread) as `cargo bench --bench training -- sliding` runs it and as a PyTorch script does
# (benches/pytorch_reference.py), in interleaved rounds so both see the same machine load.
# Prints each round's medians and the ratio. PyTorch is installed from PyPI into a virtualenv
# on first use (~5 GB with the CUDA libraries PyPI's wheel pulls in; only the CPU is used).
# Not part of CI: it needs that download and minutes of quiet CPU.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
rounds="${1:-3}"
venv="${MAD_TORCH_VENV:-$root/target/torch-venv}"
torch_version="${MAD_TORCH_VERSION:-2.15.0}"
if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  echo "installing PyTorch $torch_version into $venv (once)" >&2
  python3 -m venv "$venv"
  # numpy only quiets torch's warning that it is missing; the script does not use it.
  "$venv/bin/pip" install --quiet "torch==$torch_version" numpy
fi
cargo bench --quiet --bench training --no-run

median_of() { sed -nE "$1" | tail -1; }
ratios=()
for round in $(seq 1 "$rounds"); do
  mad=$(cargo bench --quiet --bench training -- sliding 2>/dev/null \
    | median_of 's/^median ([0-9.]+) s CPU per epoch.*/\1/p')
  torch=$("$venv/bin/python" benches/pytorch_reference.py \
    | median_of 's/^pytorch indexed batches:.* median ([0-9.]+)$/\1/p')
  if [ -z "$mad" ] || [ -z "$torch" ]; then
    echo "error: round $round printed no median (MAD '$mad', PyTorch '$torch')" >&2
    exit 1
  fi
  ratio=$(awk -v m="$mad" -v t="$torch" 'BEGIN { printf "%.2f", t / m }')
  ratios+=("$ratio")
  echo "round $round: MAD $mad s, PyTorch $torch s CPU per epoch: MAD ${ratio}x faster"
done
sorted=$(printf '%s\n' "${ratios[@]}" | sort -n)
echo "MAD against PyTorch $torch_version on this machine, same runs:" \
  "$(head -1 <<<"$sorted")x to $(tail -1 <<<"$sorted")x faster per epoch over $rounds rounds"
