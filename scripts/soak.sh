#!/usr/bin/env bash
# The soak (tests/soak.rs) for SECS seconds, default one hour: VictoriaMetrics, `mad serve`,
# vmalert, `mad relay` and a fake Telegram on loopback, with series churn and a spike every
# minute. Prints a line per round and, at the end, memory and file-descriptor figures; fails if
# an incident is not alerted and resolved exactly once or memory or descriptors grow.
#   scripts/soak.sh [SECS]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
MAD_SOAK_SECS="${1:-3600}" exec cargo test --test soak -- --nocapture
