{{/* <release>-ovtasks, or the release name alone when it already holds "ovtasks" (release `ovtasks`: ovtasks-mlflow). */}}
{{- define "ovtasks.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
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

{{/* repository:tag, or repository:tag@digest when a digest is given (the digest is what runs). */}}
{{- define "ovtasks.image" -}}
{{- if .digest -}}
{{- printf "%s:%s@%s" .repository .tag .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}
{{- end -}}

{{/* host:port of the S3 API: ovtasks.s3Endpoint, else the chart's own store. */}}
{{- define "ovtasks.s3Endpoint" -}}
{{- if .Values.ovtasks.s3Endpoint -}}
{{- .Values.ovtasks.s3Endpoint -}}
{{- else if .Values.objectStore.enabled -}}
{{- printf "%s-s3:8333" (include "ovtasks.fullname" .) -}}
{{- else -}}
{{- fail "ovtasks.s3Endpoint is required when objectStore.enabled is false" -}}
{{- end -}}
{{- end -}}

{{- define "ovtasks.s3Url" -}}
{{- printf "%s://%s" (ternary "https" "http" (.Values.ovtasks.s3Secure | default false)) (include "ovtasks.s3Endpoint" .) -}}
{{- end -}}
