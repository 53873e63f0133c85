#!/usr/bin/env bash
# All tests: unit tests, integration tests against a real VictoriaMetrics, promtool checks.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
cargo test --workspace "$@"
