{{/* Names and labels. */}}
{{- define "modelmora.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "modelmora.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "modelmora.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modelmora.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "modelmora.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "modelmora.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "modelmora.secretName" -}}
{{- default (include "modelmora.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* How many pods can run at once: several need shared state. */}}
{{- define "modelmora.multiPod" -}}
{{- if or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1) }}true{{- end }}
{{- end }}

{{/* The job store is Redis: a Redis URL in the secrets, or config.jobs.backend. Routing needs it
(the replicas find each other in the jobs' Redis). */}}
{{- define "modelmora.redisJobs" -}}
{{- if or .Values.secrets.redisUrl (eq (dig "jobs" "backend" "" (.Values.config | default dict)) "redis") }}true{{- end }}
{{- end }}

{{/* The server serves TLS: a certificate in config.server.tls (or its environment variable). */}}
{{- define "modelmora.tls" -}}
{{- if or (dig "server" "tls" "certfile" "" (.Values.config | default dict)) (get (.Values.extraEnv | default dict) "MODELMORA_SERVER__TLS__CERTFILE") }}true{{- end }}
{{- end }}

{{/* Routing between replicas (cluster.advertisePodIP, values.yaml): "true" when each pod
advertises its IP. auto: several pods with Redis jobs, the chart's own Secret (it generates the
cluster secret) and no TLS (a peer's certificate would have to name the pod's IP). */}}
{{- define "modelmora.routing" -}}
{{- $mode := toString .Values.cluster.advertisePodIP }}
{{- if eq $mode "auto" }}
{{- if and (include "modelmora.multiPod" .) (include "modelmora.redisJobs" .) (not .Values.secrets.existingSecret) (not (include "modelmora.tls" .)) }}true{{- end }}
{{- else if eq $mode "true" }}
{{- if not (include "modelmora.redisJobs" .) }}
{{- fail "cluster.advertisePodIP needs Redis jobs: the replicas find each other in the jobs' Redis (set secrets.redisUrl, or config.jobs.backend: redis with redis-url in secrets.existingSecret)" }}
{{- end }}
{{- print "true" }}
{{- else if ne $mode "false" }}
{{- fail (printf "cluster.advertisePodIP must be auto, true or false, not %q" $mode) }}
{{- end }}
{{- end }}

{{/* The URL other replicas reach a pod at (cluster.advertise_url); $(POD_IP) is expanded by the
kubelet from the variable defined before it. */}}
{{- define "modelmora.advertiseUrl" -}}
{{- printf "%s://$(POD_IP):%d" (ternary "https" "http" (eq (include "modelmora.tls" .) "true")) (int .Values.server.port) }}
{{- end }}

{{/* /data is a claim: persistence on and no model store. */}}
{{- define "modelmora.dataClaim" -}}
{{- if and .Values.persistence.enabled (not .Values.modelStore.url) }}true{{- end }}
{{- end }}

{{/* resources.max_memory_mb: the share of the container's memory limit the server budgets. */}}
{{- define "modelmora.memoryBudgetMb" -}}
{{- div (mul (int .Values.memory.limitMb) (int .Values.memory.serverBudgetPercent)) 100 }}
{{- end }}

{{/* The whole grace period: the preStop sleep, the drain, uvicorn's own wait for requests still open
after a drain that timed out (up to drain_seconds again), then the workers' exit (the margin). */}}
{{- define "modelmora.terminationGraceSeconds" -}}
{{- $drain := int (ceil .Values.server.drainSeconds) }}
{{- add (int .Values.server.preStopSleepSeconds) $drain $drain (int .Values.server.terminationMarginSeconds) }}
{{- end }}

{{/* modelmora.yaml: the user's `config` with the keys the chart owns on top. */}}
{{- define "modelmora.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- $server := dict "host" "0.0.0.0" "port" (int .Values.server.port) "grpc_port" (int .Values.server.grpcPort) "drain_seconds" .Values.server.drainSeconds "data_dir" "/data" }}
{{- $_ := set $cfg "server" (merge $server (get $cfg "server" | default dict)) }}
{{- $resources := dict "max_memory_mb" (int (include "modelmora.memoryBudgetMb" .)) }}
{{- $_ := set $cfg "resources" (merge $resources (get $cfg "resources" | default dict)) }}
{{- if .Values.secrets.redisUrl }}
{{- $_ := set $cfg "jobs" (merge (get $cfg "jobs" | default dict) (dict "backend" "redis")) }}
{{- /* Redis jobs: a result is read through whichever pod the client reaches. The claim is the
one volume every pod mounts (several pods need ReadWriteMany), so file results on it are shared;
an emptyDir is not, and results must then go to S3. */}}
{{- $results := get $cfg "results" | default dict }}
{{- if ne (get $results "backend" | default "files") "s3" }}
{{- if not (include "modelmora.dataClaim" .) }}
{{- fail "secrets.redisUrl with /data in an emptyDir (modelStore.url or persistence.enabled false): job results must be shared, set config.results.backend: s3" }}
{{- end }}
{{- $_ := set $cfg "results" (merge $results (dict "shared" true)) }}
{{- end }}
{{- end }}
{{- if .Values.modelStore.url }}
{{- $_ := set $cfg "registry" (merge (dict "model_store" .Values.modelStore.url) (get $cfg "registry" | default dict)) }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}
