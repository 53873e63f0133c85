{{/* Names ---------------------------------------------------------------------------------- */}}

{{/* The chart name, or nameOverride. */}}
{{- define "mad.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every object name: fullnameOverride, else <release>-<name>, else <release>
when the release name already contains the chart name. Kept to 40 characters so suffixes such
as "-exporter-headless" and a StatefulSet's controller-revision-hash label still fit in 63. */}}
{{- define "mad.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "mad.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mad.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mad.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mad.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) -}}
{{- end -}}

{{/* Labels ---------------------------------------------------------------------------------- */}}

{{/* Selector labels; call with (dict "root" $ "component" "exporter"). */}}
{{- define "mad.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mad.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end -}}

{{/* Every object's labels; call with (dict "root" $ "component" "exporter"), component optional. */}}
{{- define "mad.labels" -}}
helm.sh/chart: {{ include "mad.chart" .root }}
{{ include "mad.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: mad
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The store and its paths ----------------------------------------------------------------- */}}

{{/* "true" when MAD uses PostgreSQL (the DSN Secret is set, or a literal store.postgres). */}}
{{- define "mad.usePostgres" -}}
{{- $store := .Values.config.store | default dict -}}
{{- if or .Values.secrets.postgresDsn.name $store.postgres -}}true{{- end -}}
{{- end -}}

{{/* The embedded store's directory: config.store.path, default /var/lib/mad/models. */}}
{{- define "mad.storePath" -}}
{{- $store := .Values.config.store | default dict -}}
{{- $store.path | default "/var/lib/mad/models" -}}
{{- end -}}

{{/* The relay's redb file: config.relay.state_path, default /var/lib/mad-relay/relay.redb. */}}
{{- define "mad.relayStatePath" -}}
{{- $relay := .Values.config.relay | default dict -}}
{{- $relay.state_path | default "/var/lib/mad-relay/relay.redb" -}}
{{- end -}}

{{/* host:port, with brackets around an IPv6 host. Call with (list host port). */}}
{{- define "mad.listen" -}}
{{- $host := index . 0 | toString -}}
{{- if contains ":" $host -}}
{{- printf "[%s]:%d" (trimAll "[]" $host) (int (index . 1)) -}}
{{- else -}}
{{- printf "%s:%d" $host (int (index . 1)) -}}
{{- end -}}
{{- end -}}

{{/* The job label the exporter is scraped with (config.alerting.exporter_job, default "mad"). */}}
{{- define "mad.exporterJob" -}}
{{- $alerting := .Values.config.alerting | default dict -}}
{{- $alerting.exporter_job | default "mad" -}}
{{- end -}}

{{/* Number of training shards. */}}
{{- define "mad.trainerShards" -}}
{{- if kindIs "invalid" .Values.trainer.shards -}}
{{- int .Values.exporter.shards -}}
{{- else -}}
{{- int .Values.trainer.shards -}}
{{- end -}}
{{- end -}}

{{/* Checks --------------------------------------------------------------------------------- */}}

{{/* Fails the render with a clear message on an impossible combination of values. */}}
{{- define "mad.validate" -}}
{{- $config := .Values.config | default dict -}}
{{- $store := $config.store | default dict -}}
{{- $relay := $config.relay | default dict -}}
{{- $telegram := $relay.telegram | default dict -}}
{{- if not $config.datasource -}}
{{- fail "config.datasource is required (at least config.datasource.url)" -}}
{{- end -}}
{{- if lt (int .Values.exporter.shards) 1 -}}
{{- fail (printf "exporter.shards must be at least 1 (got %v)" .Values.exporter.shards) -}}
{{- end -}}
{{- if lt (int (include "mad.trainerShards" .)) 1 -}}
{{- fail (printf "trainer.shards must be at least 1 (got %v)" .Values.trainer.shards) -}}
{{- end -}}
{{- if and $store.postgres (not .Values.configAsSecret) -}}
{{- fail "config.store.postgres would put the PostgreSQL DSN (and its password) into a ConfigMap: create a Secret with the DSN and set secrets.postgresDsn.name/key (passed as MAD_POSTGRES_DSN), or set configAsSecret: true" -}}
{{- end -}}
{{- if and $telegram.token (not .Values.configAsSecret) -}}
{{- fail "config.relay.telegram.token would put the bot token into a ConfigMap: create a Secret with the token and set secrets.telegramToken.name/key (passed as MAD_TELEGRAM_TOKEN), or set configAsSecret: true" -}}
{{- end -}}
{{- if and (not (include "mad.usePostgres" .)) (not (hasPrefix "/" (include "mad.storePath" .))) -}}
{{- fail (printf "config.store.path must be an absolute path in a pod (the model volume is mounted there), got %q" (include "mad.storePath" .)) -}}
{{- end -}}
{{- if and .Values.trainer.watch.enabled (not (include "mad.usePostgres" .)) -}}
{{- fail "trainer.watch.enabled needs PostgreSQL: `mad train --watch` takes retraining requests from the PostgreSQL queue. Set secrets.postgresDsn.name (a Secret holding the DSN) or disable trainer.watch" -}}
{{- end -}}
{{- if .Values.relay.enabled -}}
{{- if kindIs "invalid" $telegram.default_chat -}}
{{- fail "relay.enabled needs config.relay.telegram.default_chat (the Telegram chat id alerts go to)" -}}
{{- end -}}
{{- $envToken := false -}}
{{- range concat (.Values.extraEnv | default list) (.Values.relay.env | default list) -}}
{{- if eq .name "MAD_TELEGRAM_TOKEN" -}}{{- $envToken = true -}}{{- end -}}
{{- end -}}
{{- if not (or .Values.secrets.telegramToken.name $telegram.token_file $telegram.token $envToken) -}}
{{- fail "relay.enabled needs a Telegram bot token: set secrets.telegramToken.name (an existing Secret, passed as MAD_TELEGRAM_TOKEN), or config.relay.telegram.token_file with the file mounted through extraVolumes" -}}
{{- end -}}
{{- if and (not (include "mad.usePostgres" .)) (not (hasPrefix "/" (include "mad.relayStatePath" .))) -}}
{{- fail (printf "config.relay.state_path must be an absolute path in a pod (the relay volume is mounted at its directory), got %q" (include "mad.relayStatePath" .)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the relay's intake token: the user's, else the one the chart creates;
empty when config.relay or the relay's environment has its own credentials. */}}
{{- define "mad.relayIntakeSecret" -}}
{{- $relay := (.Values.config | default dict).relay | default dict -}}
{{- $envToken := false -}}
{{- range concat (.Values.extraEnv | default list) (.Values.relay.env | default list) -}}
{{- if eq .name "MAD_RELAY_INTAKE_TOKEN" -}}{{- $envToken = true -}}{{- end -}}
{{- end -}}
{{- if .Values.secrets.relayIntakeToken.name -}}
{{- .Values.secrets.relayIntakeToken.name -}}
{{- else if not (or $relay.intake_token $relay.intake_basic_auth $envToken) -}}
{{- include "mad.fullname" . }}-relay-intake
{{- end -}}
{{- end -}}

{{/* The config file ------------------------------------------------------------------------ */}}

{{/* mad.yaml: .Values.config with the pod's listen addresses and volume paths filled in. */}}
{{- define "mad.configFile" -}}
{{- $config := deepCopy (.Values.config | default dict) -}}
{{- $server := $config.server | default dict -}}
{{- $_ := set $server "listen" (include "mad.listen" (list .Values.exporter.listenHost .Values.exporter.port)) -}}
{{- $_ := set $config "server" $server -}}
{{- if not (include "mad.usePostgres" .) -}}
{{- $store := $config.store | default dict -}}
{{- $_ := set $store "path" (include "mad.storePath" .) -}}
{{- $_ := set $config "store" $store -}}
{{- end -}}
{{- if $config.relay -}}
{{- $relay := $config.relay -}}
{{- $_ := set $relay "listen" (include "mad.listen" (list .Values.relay.listenHost .Values.relay.port)) -}}
{{- if not (include "mad.usePostgres" .) -}}
{{- $_ := set $relay "state_path" (include "mad.relayStatePath" .) -}}
{{- end -}}
{{- end -}}
# Rendered by the MAD Helm chart from .Values.config; see the chart's values.yaml.
{{ toYaml $config }}
{{- end -}}

{{/* Pod pieces ----------------------------------------------------------------------------- */}}

{{/* Pod annotations: the config checksum (so a config change rolls the pods), the global and the
component's annotations. Call with (dict "root" $ "values" .Values.exporter). */}}
{{- define "mad.podAnnotations" -}}
checksum/config: {{ include "mad.configFile" .root | sha256sum }}
{{- with .root.Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- with .values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod labels: selector labels plus the global and the component's pod labels.
Call with (dict "root" $ "component" "exporter" "values" .Values.exporter). */}}
{{- define "mad.podLabels" -}}
{{ include "mad.labels" (dict "root" .root "component" .component) }}
{{- with .root.Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- with .values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Environment of a container. Call with (dict "root" $ "env" list-of-extra "shards" N
"podName" bool "postgres" bool "telegram" bool). */}}
{{- define "mad.env" -}}
{{- $root := .root -}}
- name: MAD_LOG_FORMAT
  value: {{ $root.Values.logFormat | quote }}
- name: MAD_LOG
  value: {{ $root.Values.logLevel | quote }}
{{- if .shards }}
- name: MAD_SHARDS
  value: {{ .shards | toString | quote }}
{{- end }}
{{- if .podName }}
- name: MAD_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end }}
{{- if and .postgres $root.Values.secrets.postgresDsn.name }}
- name: MAD_POSTGRES_DSN
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.secrets.postgresDsn.name }}
      key: {{ $root.Values.secrets.postgresDsn.key }}
{{- end }}
{{- if and .telegram $root.Values.secrets.telegramToken.name }}
- name: MAD_TELEGRAM_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.secrets.telegramToken.name }}
      key: {{ $root.Values.secrets.telegramToken.key }}
{{- end }}
{{- if .intake }}
{{- with include "mad.relayIntakeSecret" $root }}
- name: MAD_RELAY_INTAKE_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ if $root.Values.secrets.relayIntakeToken.name }}{{ $root.Values.secrets.relayIntakeToken.key }}{{ else }}token{{ end }}
{{- end }}
{{- end }}
{{- with $root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with .env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The config volume (ConfigMap or Secret) and /tmp. */}}
{{- define "mad.baseVolumes" -}}
- name: config
{{- if .Values.configAsSecret }}
  secret:
    secretName: {{ include "mad.fullname" . }}-config
{{- else }}
  configMap:
    name: {{ include "mad.fullname" . }}-config
{{- end }}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "mad.baseVolumeMounts" -}}
- name: config
  mountPath: /etc/mad
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* The model volume of the embedded store (none with PostgreSQL). */}}
{{- define "mad.modelsVolume" -}}
{{- if not (include "mad.usePostgres" .) -}}
- name: models
{{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ .Values.persistence.existingClaim | default (printf "%s-models" (include "mad.fullname" .)) }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}
{{- end -}}

{{- define "mad.modelsVolumeMount" -}}
{{- if not (include "mad.usePostgres" .) -}}
- name: models
  mountPath: {{ include "mad.storePath" . }}
{{- end }}
{{- end -}}

{{/* The pod-level scheduling and security settings shared by all components.
Call with (dict "root" $ "values" .Values.exporter). */}}
{{- define "mad.podSpecCommon" -}}
serviceAccountName: {{ include "mad.serviceAccountName" .root }}
automountServiceAccountToken: {{ .root.Values.serviceAccount.automountServiceAccountToken }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The files of the generated rules as a JSON object name -> content: rules.content, else
files/rules/*.yml. */}}
{{- define "mad.ruleFiles" -}}
{{- $files := dict -}}
{{- if .Values.rules.content -}}
{{- $_ := set $files "mad.rules.yml" .Values.rules.content -}}
{{- else -}}
{{- range $path, $_ := .Files.Glob "files/rules/*.yml" -}}
{{- $_ := set $files (base $path) ($.Files.Get $path) -}}
{{- end -}}
{{- end -}}
{{- toJson $files -}}
{{- end -}}

{{/* An object name for a file: <fullname>-<file name without extension, as a DNS label>. */}}
{{- define "mad.fileObjectName" -}}
{{- $stem := .file | trimSuffix ".json" | trimSuffix ".yml" | trimSuffix ".yaml" | lower | replace "_" "-" | replace "." "-" | replace " " "-" -}}
{{- printf "%s-%s" (include "mad.fullname" .root) $stem | trunc 63 | trimSuffix "-" -}}
{{- end -}}
