#!/usr/bin/env bash
# The main job on embedded defaults: a local VictoriaMetrics, synthetic metrics with incidents,
# train, serve, scrape, report. Extra arguments go to `mad demo` (try --keep, --help).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
cargo build --release --quiet --bin mad
exec target/release/mad demo "$@"
