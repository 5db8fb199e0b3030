{{- define "ovtasks.fullname" -}}
{{- printf "%s-%s" .Release.Name "ovtasks" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ovtasks.labels" -}}
app.kubernetes.io/name: ovtasks
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Every credential comes from an existing Secret: refuse to render without its name. */}}
{{- define "ovtasks.requiredSecret" -}}
{{- required (printf "%s must name an existing Secret (credentials are never set in values)" .what) .name -}}
{{- end -}}
