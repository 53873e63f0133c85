#!/usr/bin/env bash
# Installs what MAD's demo and tests need on a fresh Debian machine, idempotently:
# VictoriaMetrics (+ vmalert), promtool, Alertmanager, wrk, the ONNX Runtime shared library, and
# a running PostgreSQL for the registry tests.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
need=()
command -v victoria-metrics >/dev/null 2>&1 || need+=(victoria-metrics)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# tests/alerting_e2e.rs routes vmalert through a real Alertmanager (Debian ships 0.25).
command -v prometheus-alertmanager >/dev/null 2>&1 || need+=(prometheus-alertmanager)
# scripts/schemathesis.sh: a Python venv for schemathesis, psql for its scratch database, curl.
python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
command -v curl >/dev/null 2>&1 || need+=(curl)
# benches/load.rs: concurrent scrapers.
command -v wrk >/dev/null 2>&1 || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} (Debian packages)…"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The Debian prometheus package starts a server on :9090; MAD's tests do not need it.
# The same for prometheus-alertmanager (:9093); the tests start their own on free ports.
for service in prometheus prometheus-alertmanager; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$service" 2>/dev/null; then
    systemctl stop "$service" || true
  fi
done
# The registry tests use the PostgreSQL server on 127.0.0.1:5432; start it if it is down.
if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432; then
  for version in $(ls /etc/postgresql 2>/dev/null); do
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  done
fi
"$root/scripts/fetch-onnxruntime.sh"
