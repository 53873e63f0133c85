#!/usr/bin/env bash
# All tests: unit tests, integration tests against a real VictoriaMetrics, PostgreSQL, vmalert,
# promtool; then checks that no secret the tests use (tests/secrets.txt) appears in any log
# line; ends with one "N passed, N failed" line over every test binary.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# Every `mad` process the tests start also logs here (see init_logging), for the secret check.
export MAD_LOG_DIR="$root/.run/test-logs"
rm -rf "$MAD_LOG_DIR"
mkdir -p "$MAD_LOG_DIR"
status=0
cargo test --workspace --lib --bins --tests "$@" 2>&1 | tee "$log" || status=$?
passed=$(grep -Eo '^test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '; [0-9]+ failed' "$log" | grep -Eo '[0-9]+' | awk '{s+=$1} END {print s+0}')

# No secret the tests use may appear in any log line of the suite.
patterns="$(mktemp)"
grep -v '^#' tests/secrets.txt > "$patterns"
files=$(find "$MAD_LOG_DIR" -type f | wc -l)
lines=$(cat "$MAD_LOG_DIR"/* "$log" 2>/dev/null | wc -l)
if grep -rnF -f "$patterns" "$MAD_LOG_DIR" "$log" > "$patterns.found"; then
  echo "secret check: a test secret appears in the logs:"
  cut -c1-200 "$patterns.found"
  failed=$((failed + 1))
  status=1
else
  echo "secret check: no secret in $lines log lines ($files process logs and the test output)"
fi
rm -f "$patterns" "$patterns.found"
echo "tests: $passed passed, $failed failed"
exit "$status"
