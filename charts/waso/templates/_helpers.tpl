{{- define "waso.name" -}}waso-operator{{- end -}}
{{- define "waso.labels" -}}
app.kubernetes.io/name: waso-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: waso
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
{{- define "waso.selector" -}}
app.kubernetes.io/name: waso-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
