{{/* vim: set filetype=mustache: */}}

{{- define "redrec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Object-name prefix. Truncated to 40 characters so that "<prefix>-<part>-<suffix>" names stay
within the 63-character DNS label limit (CronJob names must leave room for the Job suffix).
*/}}
{{- define "redrec.fullname" -}}
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

{{- define "redrec.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "redrec.labels" -}}
helm.sh/chart: {{ include "redrec.chart" . }}
app.kubernetes.io/name: {{ include "redrec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: redrec
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one part: (dict "ctx" $ "component" "serving"). */}}
{{- define "redrec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "redrec.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels of one part's objects: (dict "ctx" $ "component" "serving"). */}}
{{- define "redrec.componentLabels" -}}
{{ include "redrec.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "redrec.serving.fullname" -}}{{ include "redrec.fullname" . }}-serving{{- end -}}
{{- define "redrec.feast.fullname" -}}{{ include "redrec.fullname" . }}-feast{{- end -}}
{{- /* "true" when the PrometheusRule is rendered: enabled=true, or "auto" on a cluster serving its
       CRD (helm template: --api-versions monitoring.coreos.com/v1/PrometheusRule) */ -}}
{{- define "redrec.prometheusRule.enabled" -}}
{{- $on := toString .Values.prometheusRule.enabled -}}
{{- if or (eq $on "true") (and (eq $on "auto") (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/PrometheusRule")) -}}
true
{{- end -}}
{{- end -}}

{{- define "redrec.drift.fullname" -}}{{ include "redrec.fullname" . }}-drift{{- end -}}
{{- define "redrec.config.fullname" -}}{{ include "redrec.fullname" . }}-config{{- end -}}
{{- /* The release ConfigMap: written by the pipeline's deploy step and `redrec release promote|rollback`
       (arm -> model version), NEVER rendered by this chart, so a helm upgrade cannot revert a release.
       Pods that serve or onboard for the served models mount it as an optional volume. */ -}}
{{- define "redrec.release.fullname" -}}{{ include "redrec.fullname" . }}-release{{- end -}}
{{- define "redrec.release.dir" -}}/etc/redrec-release{{- end -}}
{{- define "redrec.release.env" -}}
- name: REDREC_RELEASE_OVERLAY
  value: {{ include "redrec.release.dir" . }}/release.yaml
{{- end -}}
{{- define "redrec.release.volumeMount" -}}
- name: release
  mountPath: {{ include "redrec.release.dir" . }}
  readOnly: true
{{- end -}}
{{- define "redrec.release.volume" -}}
- name: release
  configMap:
    name: {{ include "redrec.release.fullname" . }}
    # absent until the first deploy: the values' model versions serve meanwhile
    optional: true
{{- end -}}

{{- define "redrec.serving.serviceAccountName" -}}
{{- if .Values.serving.serviceAccount.create -}}
{{- default (include "redrec.serving.fullname" .) .Values.serving.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serving.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "redrec.feast.serviceAccountName" -}}
{{- if .Values.feast.serviceAccount.create -}}
{{- default (include "redrec.feast.fullname" .) .Values.feast.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.feast.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "redrec.drift.serviceAccountName" -}}
{{- if .Values.drift.serviceAccount.create -}}
{{- default (include "redrec.drift.fullname" .) .Values.drift.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.drift.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
Image reference: (dict "ctx" $ "image" .Values.feast.image). Empty fields fall back to
.Values.image; the tag falls back to the chart's appVersion; a digest wins over the tag.
*/}}
{{- define "redrec.image" -}}
{{- $base := .ctx.Values.image -}}
{{- $img := .image | default dict -}}
{{- $repo := $img.repository | default $base.repository -}}
{{- /* global.imageRegistry (a mirror) replaces the repository's registry host, or prefixes a
       repository that names none */ -}}
{{- $registry := dig "imageRegistry" "" (.ctx.Values.global | default dict) -}}
{{- if $registry -}}
{{- $parts := splitList "/" $repo -}}
{{- $first := first $parts -}}
{{- if and (gt (len $parts) 1) (or (contains "." $first) (contains ":" $first) (eq $first "localhost")) -}}
{{- $parts = rest $parts -}}
{{- end -}}
{{- $repo = printf "%s/%s" (trimSuffix "/" $registry) (join "/" $parts) -}}
{{- end -}}
{{- $digest := $img.digest | default "" -}}
{{- $tag := $img.tag | default "" -}}
{{- if and (not $img.repository) (not $digest) (not $tag) -}}
{{- $digest = $base.digest -}}
{{- $tag = $base.tag -}}
{{- end -}}
{{- if $digest -}}
{{- printf "%s@%s" $repo $digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .ctx.Chart.AppVersion $tag) -}}
{{- end -}}
{{- end -}}

{{- define "redrec.imagePullPolicy" -}}
{{- $img := .image | default dict -}}
{{- $img.pullPolicy | default .ctx.Values.image.pullPolicy -}}
{{- end -}}

{{/* Pod-level security context (hardening fixed, ids from values). */}}
{{- define "redrec.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: {{ .Values.securityContext.seccompProfile.type }}
  {{- if eq .Values.securityContext.seccompProfile.type "Localhost" }}
  localhostProfile: {{ required "securityContext.seccompProfile.localhostProfile is required when type=Localhost" .Values.securityContext.seccompProfile.localhostProfile | quote }}
  {{- end }}
{{- end -}}

{{/* Container-level security context: non-root, read-only root FS, no escalation, no capabilities. */}}
{{- define "redrec.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
{{- end -}}

{{/*
Port of a URL: (dict "url" "http://host:19530" "default" 80). Falls back to the scheme's
default port (https 443, http 80) and then to "default".
*/}}
{{- define "redrec.urlPort" -}}
{{- $u := urlParse .url -}}
{{- $hostport := $u.host -}}
{{- $parts := splitList ":" $hostport -}}
{{- if and (gt (len $parts) 1) (regexMatch "^[0-9]+$" (last $parts)) -}}
{{- last $parts -}}
{{- else if eq $u.scheme "https" -}}
443
{{- else if eq $u.scheme "http" -}}
80
{{- else -}}
{{- .default -}}
{{- end -}}
{{- end -}}

{{/* Host of a URL. */}}
{{- define "redrec.urlHost" -}}
{{- $u := urlParse .url -}}
{{- first (splitList ":" $u.host) -}}
{{- end -}}

{{/* Port of the Redis connection string "host:port[,opt=val...]" (default 6379). */}}
{{- define "redrec.redisPort" -}}
{{- $hostport := first (splitList "," .Values.feast.onlineStore.redis.connectionString) -}}
{{- $parts := splitList ":" $hostport -}}
{{- if and (gt (len $parts) 1) (regexMatch "^[0-9]+$" (last $parts)) -}}
{{- last $parts -}}
{{- else -}}
6379
{{- end -}}
{{- end -}}

{{/* URL of the feature server the serving pods use. */}}
{{- define "redrec.featureServerUrl" -}}
{{- if .Values.feast.enabled -}}
{{- printf "http://%s.%s.svc:%d" (include "redrec.feast.fullname" .) .Release.Namespace (int .Values.feast.port) -}}
{{- else -}}
{{- required "feast.externalUrl is required when feast.enabled=false (the serving pods need a feature server)" .Values.feast.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* Namespace the KFP runs are created in. */}}
{{- define "redrec.kfpNamespace" -}}
{{- default .Release.Namespace .Values.kfp.namespace -}}
{{- end -}}

{{/* SQLAlchemy URL of a SQL registry; the password is expanded from the environment by Feast
(serving: by redrec) when the YAML is read. */}}
{{- define "redrec.feast.sqlRegistryUrl" -}}
{{- $reg := .Values.feast.registry.sql -}}
{{- $q := printf "sslmode=%s" $reg.sslmode -}}
{{- if and (has $reg.sslmode (list "verify-ca" "verify-full")) .Values.feast.onlineStore.postgres.sslRootCertSecret.name -}}
{{- $q = printf "%s&sslrootcert=/etc/redrec-tls/postgres-root.crt" $q -}}
{{- end -}}
{{- printf "%s://%s:${FEAST_REGISTRY_PASSWORD}@%s:%d/%s?%s" $reg.driver $reg.user $reg.host (int $reg.port) $reg.database $q -}}
{{- end -}}

{{/* The Postgres CA bundle (verify-ca / verify-full), as a volume named postgres-ca. */}}
{{- define "redrec.postgresCaVolume" -}}
- name: postgres-ca
  secret:
    secretName: {{ .Values.feast.onlineStore.postgres.sslRootCertSecret.name }}
    items:
      - key: {{ .Values.feast.onlineStore.postgres.sslRootCertSecret.key }}
        path: postgres-root.crt
{{- end -}}

{{/*
Env of a Feast client (serving, ingest): both read Feast through the feature server with the
remote online store, which loads the feature definitions from the feature server's registry
itself, so a SQL registry's password must reach every client, not only the feature server.
*/}}
{{- define "redrec.feastClient.env" -}}
- name: REDREC_FEATURE_SERVER_URL
  value: {{ include "redrec.featureServerUrl" . | quote }}
{{- if and .Values.feast.enabled (eq .Values.feast.registry.type "sql") }}
# the remote online store reads the feature definitions from the feature server's SQL registry
- name: FEAST_REGISTRY_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.feast.registry.sql.passwordSecret.name }}
      key: {{ .Values.feast.registry.sql.passwordSecret.key }}
{{- end }}
{{- end -}}

{{/* Whether a Feast client connects to the SQL registry with the Postgres CA ("true" or ""). */}}
{{- define "redrec.feastClient.needsCa" -}}
{{- if and .Values.feast.enabled (eq .Values.feast.registry.type "sql") .Values.feast.onlineStore.postgres.sslRootCertSecret.name -}}
true
{{- end -}}
{{- end -}}

{{/* Volume mounts of a Feast client: the Postgres CA for a verify-ca/verify-full SQL registry. */}}
{{- define "redrec.feastClient.volumeMounts" -}}
{{- if include "redrec.feastClient.needsCa" . -}}
- name: postgres-ca
  mountPath: /etc/redrec-tls
  readOnly: true
{{- end -}}
{{- end -}}

{{/* Volumes of a Feast client, matching redrec.feastClient.volumeMounts. */}}
{{- define "redrec.feastClient.volumes" -}}
{{- if include "redrec.feastClient.needsCa" . -}}
{{ include "redrec.postgresCaVolume" . }}
{{- end -}}
{{- end -}}

{{- define "redrec.ingest.fullname" -}}{{ include "redrec.fullname" . }}-ingest{{- end -}}

{{- define "redrec.ingest.serviceAccountName" -}}
{{- if .Values.ingest.serviceAccount.create -}}
{{- default (include "redrec.ingest.fullname" .) .Values.ingest.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.ingest.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Whether the event log is on Redis, i.e. the ingest workers run ("true" or ""). */}}
{{- define "redrec.eventLog.redis" -}}
{{- if eq .Values.events.log "redis" -}}
true
{{- end -}}
{{- end -}}

{{/*
Env of a client of the event log (serving appends, ingest reads): the URL and user repeat the
config.yaml values (the code's env overrides), the password comes only from its Secret.
*/}}
{{- define "redrec.eventLog.env" -}}
{{- $r := .Values.events.redis -}}
- name: REDREC_EVENTS_REDIS_URL
  value: {{ $r.url | quote }}
{{- with $r.username }}
- name: REDREC_EVENTS_REDIS_USERNAME
  value: {{ . | quote }}
{{- end }}
- name: REDREC_EVENTS_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ required "events.redis.passwordSecret.name is required while events.log=redis (a Secret with the password of the log's Redis ACL user; see docs/install-kubernetes.md), or set events.log=embedded" $r.passwordSecret.name }}
      key: {{ $r.passwordSecret.key }}
{{- end -}}

{{/* Port of events.redis.url (default 6379). */}}
{{- define "redrec.eventLog.port" -}}
{{- include "redrec.urlPort" (dict "url" .Values.events.redis.url "default" 6379) -}}
{{- end -}}

{{/* Directory the API tokens Secret is mounted at, and the tokens file in it. */}}
{{- define "redrec.auth.tokensDir" -}}/etc/redrec-auth{{- end -}}
{{- define "redrec.auth.tokensFile" -}}{{ include "redrec.auth.tokensDir" . }}/tokens{{- end -}}

{{/* Name of the serving-log claim. */}}
{{- define "redrec.servingLog.claimName" -}}
{{- default (printf "%s-serving-log" (include "redrec.fullname" .)) .Values.serving.servingLog.persistence.existingClaim -}}
{{- end -}}

{{/* Effective minimum number of serving replicas. */}}
{{- define "redrec.serving.minReplicas" -}}
{{- if .Values.serving.autoscaling.enabled -}}
{{- .Values.serving.autoscaling.minReplicas | int -}}
{{- else -}}
{{- .Values.serving.replicaCount | int -}}
{{- end -}}
{{- end -}}

{{/*
Cross-field checks the JSON schema cannot express. Included once from configmap.yaml, so any
inconsistency stops rendering with a message naming the values to fix.
*/}}
{{- define "redrec.validate" -}}
{{- $sum := 0.0 -}}
{{- $names := list -}}
{{- range .Values.config.experiment.arms -}}
{{- $sum = addf $sum .share -}}
{{- if has .name $names -}}
{{- fail (printf "config.experiment.arms: arm name %q is used twice; arm names must be unique" .name) -}}
{{- end -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- if and (eq (default "ab" .Values.config.experiment.type) "interleaving") (ne (len .Values.config.experiment.arms) 2) -}}
{{- fail (printf "config.experiment.arms: an interleaving experiment merges exactly two arms' rankings, %d given; list two arms or set config.experiment.type to ab" (len .Values.config.experiment.arms)) -}}
{{- end -}}
{{- if or (lt $sum 0.999) (gt $sum 1.001) -}}
{{- fail (printf "config.experiment.arms: the arm shares sum to %v, they must sum to 1 (the holdout is taken out first, by config.experiment.holdoutShare)" $sum) -}}
{{- end -}}
{{- $min := include "redrec.serving.minReplicas" . | int -}}
{{- $grace := int .Values.serving.terminationGracePeriodSeconds -}}
{{- $stop := add (int .Values.serving.preStopSleepSeconds) (ceil .Values.config.serving.drainSeconds | int) 30 -}}
{{- if lt $grace $stop -}}
{{- fail (printf "serving.terminationGracePeriodSeconds (%d) is shorter than serving.preStopSleepSeconds + config.serving.drainSeconds + 30 (the longest request) = %d: a pod would be killed with requests in flight; raise it to %d or shorten the sleep or the drain" $grace $stop $stop) -}}
{{- end -}}
{{- $cpu := dig "limits" "cpu" "" .Values.serving.resources | toString -}}
{{- if $cpu -}}
{{- $cores := ternary (divf (trimSuffix "m" $cpu | float64) 1000.0) ($cpu | float64) (hasSuffix "m" $cpu) -}}
{{- if gt (float64 .Values.config.serving.workers) (maxf 1.0 $cores) -}}
{{- fail (printf "config.serving.workers (%d) is above the serving pod's CPU limit (%s): each worker needs about a core, so the extra ones only add latency and memory; lower config.serving.workers (1 on a 1-core pod) or raise serving.resources.limits.cpu" (int .Values.config.serving.workers) $cpu) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.serving.pdb.enabled (lt $min 2) -}}
{{- fail (printf "serving.pdb.enabled=true with %d serving replica(s) would block node drains; raise serving.replicaCount / serving.autoscaling.minReplicas to 2 or more, or set serving.pdb.enabled=false" $min) -}}
{{- end -}}
{{- $pdbMin := .Values.serving.pdb.minAvailable -}}
{{- if and .Values.serving.pdb.enabled (not (kindIs "string" $pdbMin)) (ge (int $pdbMin) $min) -}}
{{- fail (printf "serving.pdb.minAvailable (%d) must be below the serving replicas (%d): otherwise no pod may ever be evicted and node drains hang; lower it or raise serving.replicaCount / serving.autoscaling.minReplicas" (int $pdbMin) $min) -}}
{{- end -}}
{{- if and .Values.serving.pdb.enabled (kindIs "string" $pdbMin) (eq (trimSuffix "%" $pdbMin) "100") -}}
{{- fail "serving.pdb.minAvailable 100% never lets a pod be evicted (node drains hang); use a lower percentage or an integer below the replicas" -}}
{{- end -}}
{{- $feastMin := .Values.feast.pdb.minAvailable -}}
{{- if and .Values.feast.enabled .Values.feast.pdb.enabled (ge (int .Values.feast.replicaCount) 2) (not (kindIs "string" $feastMin)) (ge (int $feastMin) (int .Values.feast.replicaCount)) -}}
{{- fail (printf "feast.pdb.minAvailable (%d) must be below feast.replicaCount (%d): otherwise node drains hang" (int $feastMin) (int .Values.feast.replicaCount)) -}}
{{- end -}}
{{- if and .Values.feast.enabled .Values.feast.pdb.enabled (lt (int .Values.feast.replicaCount) 2) -}}
{{- fail (printf "feast.pdb.enabled=true with %d feature-server replica(s) would block node drains; raise feast.replicaCount to 2 or more, or set feast.pdb.enabled=false" (int .Values.feast.replicaCount)) -}}
{{- end -}}
{{- if .Values.serving.autoscaling.enabled -}}
{{- if lt (int .Values.serving.autoscaling.maxReplicas) (int .Values.serving.autoscaling.minReplicas) -}}
{{- fail (printf "serving.autoscaling.maxReplicas (%d) is below serving.autoscaling.minReplicas (%d)" (int .Values.serving.autoscaling.maxReplicas) (int .Values.serving.autoscaling.minReplicas)) -}}
{{- end -}}
{{- if not (dig "requests" "cpu" "" .Values.serving.resources) -}}
{{- fail "serving.autoscaling needs serving.resources.requests.cpu (CPU utilization is measured against the request)" -}}
{{- end -}}
{{- end -}}
{{- $log := .Values.serving.servingLog.persistence -}}
{{- if and $log.enabled (not $log.existingClaim) (gt $min 1) (not (has "ReadWriteMany" $log.accessModes)) -}}
{{- fail "serving.servingLog.persistence: more than one serving replica shares the claim; accessModes must include ReadWriteMany (or use an existingClaim)" -}}
{{- end -}}
{{- if .Values.drift.enabled -}}
{{- if not .Values.serving.servingLog.persistence.enabled -}}
{{- fail "drift.enabled=true needs serving.servingLog.persistence.enabled=true: with the log on a per-pod emptyDir the drift job reads nothing and reports \"insufficient data\" every run (or set drift.enabled=false)" -}}
{{- end -}}
{{- $ret := .Values.serving.servingLog.retentionHours | float64 -}}
{{- if and (gt $ret 0.0) (lt $ret (.Values.drift.windowHours | float64)) -}}
{{- fail (printf "serving.servingLog.retentionHours (%v) is shorter than drift.windowHours (%v): the drift job would compare a window the log no longer holds; raise the retention (or 0 to keep everything)" $ret .Values.drift.windowHours) -}}
{{- end -}}
{{- $dp := .Values.drift.persistence -}}
{{- if and $dp.enabled (not $dp.existingClaim) -}}
{{- fail "drift.persistence.existingClaim is required when drift.persistence.enabled=true (the training pipeline's workspace claim, which holds the drift reference; the chart does not create it)" -}}
{{- end -}}
{{- $root := trimSuffix "/" $dp.mountPath -}}
{{- if not (hasPrefix (printf "%s/" $root) (printf "%s/" (trimSuffix "/" .Values.drift.reportDir))) -}}
{{- fail (printf "drift.reportDir (%s) must be under drift.persistence.mountPath (%s): the drift pod's root filesystem is read-only, so reports can only be written to that volume" .Values.drift.reportDir $dp.mountPath) -}}
{{- end -}}
{{- $ref := printf "%s/" (trimSuffix "/" .Values.drift.referenceDir) -}}
{{- $rep := printf "%s/" (trimSuffix "/" .Values.drift.reportDir) -}}
{{- if eq $rep $ref -}}
{{- fail (printf "drift.reportDir and drift.referenceDir are both %s; reports must not be written into the reference" .Values.drift.reportDir) -}}
{{- end -}}
{{- if or (hasPrefix $ref $rep) (hasPrefix $rep $ref) -}}
{{- fail (printf "drift.reportDir (%s) and drift.referenceDir (%s) are nested: the drift job mounts the reference read-only and the reports writable, each its own directory; make them siblings" .Values.drift.reportDir .Values.drift.referenceDir) -}}
{{- end -}}
{{- if and $dp.enabled (not (hasPrefix (printf "%s/" $root) $ref)) -}}
{{- fail (printf "drift.referenceDir (%s) must be under drift.persistence.mountPath (%s): the drift job mounts it from that claim (read-only)" .Values.drift.referenceDir $dp.mountPath) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.feast.enabled (eq .Values.feast.onlineStore.type "postgres") (not .Values.feast.onlineStore.postgres.host) -}}
{{- fail "feast.onlineStore.postgres.host is required when feast.onlineStore.type=postgres" -}}
{{- end -}}
{{- if and .Values.feast.enabled (eq .Values.feast.onlineStore.type "postgres") (not .Values.feast.onlineStore.postgres.passwordSecret.name) -}}
{{- fail "feast.onlineStore.postgres.passwordSecret.name is required when feast.onlineStore.type=postgres (the password is only taken from a Secret)" -}}
{{- end -}}
{{- if and .Values.feast.enabled (eq .Values.feast.registry.type "sql") (not .Values.feast.registry.sql.host) -}}
{{- fail "feast.registry.sql.host is required when feast.registry.type=sql" -}}
{{- end -}}
{{- if and .Values.feast.enabled (eq .Values.feast.registry.type "sql") (not .Values.feast.registry.sql.passwordSecret.name) -}}
{{- fail "feast.registry.sql.passwordSecret.name is required when feast.registry.type=sql (the password is only taken from a Secret)" -}}
{{- end -}}
{{- if and .Values.feast.enabled (eq .Values.feast.registry.type "file") (not .Values.feast.registry.path) -}}
{{- fail "feast.registry.path is required when feast.registry.type=file" -}}
{{- end -}}
{{- $pg := .Values.feast.onlineStore.postgres -}}
{{- if and .Values.feast.enabled (eq .Values.feast.onlineStore.type "postgres") (has $pg.sslmode (list "verify-ca" "verify-full")) (not $pg.sslRootCertSecret.name) -}}
{{- fail (printf "feast.onlineStore.postgres.sslmode=%s verifies the server against a CA the pod must have: set feast.onlineStore.postgres.sslRootCertSecret.name (a Secret with the CA bundle under sslRootCertSecret.key), or use sslmode require" $pg.sslmode) -}}
{{- end -}}
{{- if and .Values.feast.enabled (eq .Values.feast.registry.type "sql") (has .Values.feast.registry.sql.sslmode (list "verify-ca" "verify-full")) (not $pg.sslRootCertSecret.name) -}}
{{- fail "feast.registry.sql.sslmode verify-ca/verify-full uses the CA bundle of feast.onlineStore.postgres.sslRootCertSecret: set it, or use sslmode require" -}}
{{- end -}}
{{- if and (eq .Values.events.log "embedded") (or .Values.serving.autoscaling.enabled (gt $min 1)) -}}
{{- fail (printf "events.log=embedded applies events inside each serving pod: with %s serving replicas two pods may write one user's history at once and lose an event; set events.log=redis (the ingest workers write one user at a time), or one replica without autoscaling" (ternary "autoscaled" (toString $min) .Values.serving.autoscaling.enabled)) -}}
{{- end -}}
{{- if eq .Values.events.log "redis" -}}
{{- $ing := .Values.ingest -}}
{{- if gt (int $ing.replicaCount) (int .Values.events.partitions) -}}
{{- fail (printf "ingest.replicaCount (%d) is above events.partitions (%d): each partition has one worker at a time, so the extra workers would idle; lower the replicas or raise the partitions (before any event is logged)" (int $ing.replicaCount) (int .Values.events.partitions)) -}}
{{- end -}}
{{- $ingMin := $ing.pdb.minAvailable -}}
{{- if and $ing.pdb.enabled (ge (int $ing.replicaCount) 2) (not (kindIs "string" $ingMin)) (ge (int $ingMin) (int $ing.replicaCount)) -}}
{{- fail (printf "ingest.pdb.minAvailable (%d) must be below ingest.replicaCount (%d): otherwise node drains hang" (int $ingMin) (int $ing.replicaCount)) -}}
{{- end -}}
{{- end -}}
{{- if and (not .Values.feast.enabled) (not .Values.feast.externalUrl) -}}
{{- fail "feast.externalUrl is required when feast.enabled=false (the serving pods need a feature server)" -}}
{{- end -}}
{{- end -}}

{{/* Egress rule for DNS (UDP and TCP 53) to networkPolicy.dnsTo. */}}
{{- define "redrec.networkPolicy.dnsEgress" -}}
# DNS.
- ports:
    - protocol: UDP
      port: 53
    - protocol: TCP
      port: 53
  {{- with .Values.networkPolicy.dnsTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/*
Egress of a Feast client (serving, ingest): the feature server, and the registry the remote
online store loads (the SQL port, or object storage for a file registry on s3:// / gs://).
(dict "ctx" $ "modelStore" true) adds object storage for an s3:// / gs:// modelStore.uri.
*/}}
{{- define "redrec.networkPolicy.feastClientEgress" -}}
{{- $withModelStore := .modelStore -}}
{{- $ := .ctx -}}
{{- $np := $.Values.networkPolicy -}}
{{- $reg := $.Values.feast.registry -}}
{{- if $.Values.feast.enabled }}
- to:
    - podSelector:
        matchLabels:
          {{- include "redrec.selectorLabels" (dict "ctx" $ "component" "feature-server") | nindent 10 }}
  ports:
    - protocol: TCP
      port: {{ $.Values.feast.port }}
{{- else }}
# External feature server: its port, any destination.
- ports:
    - protocol: TCP
      port: {{ include "redrec.urlPort" (dict "url" $.Values.feast.externalUrl "default" 6566) }}
{{- end }}
{{- if and $.Values.feast.enabled (eq $reg.type "sql") }}
# SQL registry (the feature definitions).
- ports:
    - protocol: TCP
      port: {{ $reg.sql.port }}
  {{- with $np.registryTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- $objectStore := false }}
{{- range list "s3://" "gs://" "gcs://" }}
{{- if or (and $withModelStore (hasPrefix . $.Values.modelStore.uri)) (and $.Values.feast.enabled (eq $reg.type "file") (hasPrefix . $reg.path)) }}
{{- $objectStore = true }}
{{- end }}
{{- end }}
{{- if and $objectStore $np.objectStorePorts }}
# Object storage: {{ if $withModelStore }}the model store and/or {{ end }}the file registry.
- ports:
    {{- range $np.objectStorePorts }}
    - protocol: TCP
      port: {{ . }}
    {{- end }}
  {{- with $np.objectStoreTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Egress rule to the event log's Redis (port from events.redis.url, peers networkPolicy.eventLogTo). */}}
{{- define "redrec.networkPolicy.eventLogEgress" -}}
# Event log (Redis Streams, port from events.redis.url).
- ports:
    - protocol: TCP
      port: {{ include "redrec.eventLog.port" . }}
  {{- with .Values.networkPolicy.eventLogTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* Name of the items onboarding Job: one per release, so two runs never overlap. */}}
{{- define "redrec.items.jobName" -}}{{ include "redrec.fullname" . }}-items-onboard{{- end -}}

{{/*
Checks of the onboarding Job the schema cannot express (it checks that exactly one file source
is given). Included from items-job.yaml only: they bind only when the Job is rendered.
*/}}
{{- define "redrec.items.validate" -}}
{{- $o := .Values.items.onboarding -}}
{{- $ms := .Values.modelStore -}}
{{- if not $ms.uri -}}
{{- fail "items.onboarding needs modelStore.uri: the added items are written beside the served models in the model store, and a model bundled in the image cannot take them; serve from a model store (modelStore.uri and, for a path, modelStore.existingClaim)" -}}
{{- end -}}
{{- if and (hasPrefix "/" $ms.uri) (not $ms.existingClaim) -}}
{{- fail (printf "items.onboarding: modelStore.uri %s is a path, but modelStore.existingClaim is empty: the Job writes the store on that claim; set modelStore.existingClaim (the pipeline workspace claim)" $ms.uri) -}}
{{- end -}}
{{- if $o.path -}}
{{- $root := trimSuffix "/" $ms.mountPath -}}
{{- if or (not $ms.existingClaim) (not (hasPrefix (printf "%s/" $root) $o.path)) -}}
{{- fail (printf "items.onboarding.path (%s) must be under modelStore.mountPath (%s) on modelStore.existingClaim (%s), the only volume the Job has it from; copy the file there, or use items.onboarding.configMap.name" $o.path $ms.mountPath (default "none" $ms.existingClaim)) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.milvus.tokenSecret.name (not $o.milvusTokenSecret.name) -}}
{{- fail (printf "items.onboarding.milvusTokenSecret.name is required while milvus.tokenSecret is set: the Job upserts into every arm's collection, and serving's token (%s) only reads in the documented install; name a Secret whose token may write them (e.g. milvus-credentials, the training pipeline's), or serving's own if its user may write" .Values.milvus.tokenSecret.name) -}}
{{- end -}}
{{- end -}}
