{{- define "flashsale.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "flashsale.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "flashsale.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "flashsale.serviceAccountName" -}}
{{- default (include "flashsale.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "flashsale.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "flashsale.dataplaneImage" -}}
{{- default (printf "ghcr.io/flashsale/dataplane:%s" .Chart.AppVersion) .Values.dataplaneImage -}}
{{- end -}}

{{- /* The runbook base written in rules/flashsale.rules.yaml; prometheusRule.runbookBaseUrl replaces it. */ -}}
{{- define "flashsale.runbookBase" -}}
https://example.invalid/flashsale/blob/main/docs/operations.md
{{- end -}}
