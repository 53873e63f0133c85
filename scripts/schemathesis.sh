#!/usr/bin/env bash
# Fuzzes the management API against docs/openapi.yaml with schemathesis: a real `mad serve`
# on a scratch PostgreSQL database (127.0.0.1:5432, user postgres) and a real VictoriaMetrics.
# Exits non-zero when schemathesis finds a failure (server errors, responses not matching the
# schema). Extra arguments go to `schemathesis run`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# VictoriaMetrics, the ONNX Runtime library and a running PostgreSQL.
scripts/setup.sh

SCHEMATHESIS_SPEC="${SCHEMATHESIS_SPEC:-schemathesis>=4.32,<5}"
MAX_EXAMPLES="${SCHEMATHESIS_MAX_EXAMPLES:-100}"
venv="$root/.run/venv"

# schemathesis in its own venv, installed once.
if ! "$venv/bin/schemathesis" --version >/dev/null 2>&1; then
  echo "installing schemathesis into $venv…"
  mkdir -p "$root/.run"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "$SCHEMATHESIS_SPEC"
fi
"$venv/bin/schemathesis" --version

cargo build --quiet --bin mad

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

work="$(mktemp -d "$root/.run/schemathesis.XXXXXX")"
db="mad_schemathesis_$$"
vm_pid=""
mad_pid=""
psql_admin=(psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -q -v ON_ERROR_STOP=1)
cleanup() {
  [ -n "$mad_pid" ] && kill "$mad_pid" 2>/dev/null && wait "$mad_pid" 2>/dev/null
  [ -n "$vm_pid" ] && kill "$vm_pid" 2>/dev/null && wait "$vm_pid" 2>/dev/null
  "${psql_admin[@]}" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

wait_for() { # URL WHAT
  for _ in $(seq 1 200); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$2 did not come up at $1" >&2
  return 1
}

vm_port="$(free_port)"
victoria-metrics -httpListenAddr="127.0.0.1:$vm_port" -storageDataPath="$work/vm" \
  -search.latencyOffset=0s -loggerLevel=ERROR >"$work/vm.log" 2>&1 &
vm_pid=$!
wait_for "http://127.0.0.1:$vm_port/health" victoria-metrics

"${psql_admin[@]}" -c "CREATE DATABASE $db"

port="$(free_port)"
token="schemathesis-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
cat >"$work/mad.yaml" <<EOF
datasource: { url: "http://127.0.0.1:$vm_port", retries: 0, timeout: 5s }
store: { postgres: "postgres://postgres@127.0.0.1:5432/$db" }
server: { listen: "127.0.0.1:$port", reload_interval: 1h, api_token: "$token" }
onnxruntime: { library: "$root/.ort/libonnxruntime.so" }
detectors:
  - { name: cpu, query: up, step: 1m, window: 8, train_range: 1d }
EOF
MAD_LOG=warn target/debug/mad serve --config "$work/mad.yaml" >"$work/mad.log" 2>&1 &
mad_pid=$!
if ! wait_for "http://127.0.0.1:$port/healthz" "mad serve"; then
  cat "$work/mad.log" >&2
  exit 1
fi

status=0
# Run from the scratch folder: schemathesis keeps a cache in its working directory.
(cd "$work" && "$venv/bin/schemathesis" run "$root/docs/openapi.yaml" \
  --url "http://127.0.0.1:$port/api/v1" \
  --header "Authorization: Bearer $token" \
  --max-examples "$MAX_EXAMPLES" \
  --seed 1 \
  --generation-database "$root/.run/schemathesis-examples" \
  --phases examples,coverage,fuzzing,stateful \
  --checks all \
  --exclude-checks positive_data_acceptance \
  --request-timeout 20 \
  --no-color \
  "$@") || status=$?

if ! kill -0 "$mad_pid" 2>/dev/null; then
  echo "mad serve died during the run:" >&2
  tail -50 "$work/mad.log" >&2
  status=1
fi
if grep -q "panicked" "$work/mad.log"; then
  echo "mad serve panicked:" >&2
  grep -A5 "panicked" "$work/mad.log" >&2
  status=1
fi
exit "$status"
