{{- define "waso.name" -}}waso-operator{{- end -}}
{{- define "waso.commonLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: waso
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
{{- define "waso.labels" -}}
app.kubernetes.io/name: waso-operator
app.kubernetes.io/component: operator
{{ include "waso.commonLabels" . }}
{{- end -}}
{{- define "waso.selector" -}}
app.kubernetes.io/name: waso-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "waso.image" -}}{{ printf "%s:%s" .Values.image.repository .Values.image.tag }}{{- end -}}

{{/* The WhatsApp simulator (simulator.enabled). */}}
{{- define "waso.simulator.name" -}}{{ .Release.Name }}-simulator{{- end -}}
{{- define "waso.simulator.labels" -}}
app.kubernetes.io/name: waso-simulator
app.kubernetes.io/component: simulator
{{ include "waso.commonLabels" . }}
{{- end -}}
{{- define "waso.simulator.selector" -}}
app.kubernetes.io/name: waso-simulator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "waso.simulator.url" -}}
{{ printf "http://%s.%s.svc:%d" (include "waso.simulator.name" .) .Release.Namespace (int .Values.simulator.port) }}
{{- end -}}

{{/*
The operator's configuration file: .Values.config as it is (its keys are the operator's own,
values.schema.json is generated from the operator's model), plus the settings the chart owns.
*/}}
{{- define "waso.config" -}}
{{- $config := deepCopy (.Values.config | default dict) -}}
{{- $_ := set $config "runtimeImage" (include "waso.image" .) -}}
{{- $_ = set $config "imagePullPolicy" .Values.image.pullPolicy -}}
{{- $_ = set $config "metricsPort" (int .Values.metrics.port) -}}
{{- if .Values.simulator.enabled -}}
{{- $_ = set $config "transport" "simulator" -}}
{{- if not $config.simulatorUrl -}}
{{- $_ = set $config "simulatorUrl" (include "waso.simulator.url" .) -}}
{{- end -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}
