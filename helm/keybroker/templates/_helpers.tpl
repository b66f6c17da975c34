{{- define "keybroker.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "keybroker.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "keybroker.labels" -}}
{{ include "keybroker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "keybroker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "keybroker.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "keybroker.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "keybroker.fullname" .)) .Values.tls.existingSecret -}}
{{- end -}}

{{/* The Secret holding the platform keyring, if any. */}}
{{- define "keybroker.keyringSecretName" -}}
{{- if .Values.keyring.existingSecret -}}
{{- .Values.keyring.existingSecret -}}
{{- else if .Values.keyring.json -}}
{{- printf "%s-keyring" (include "keybroker.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Settings that cannot work together fail the install with the reason. */}}
{{- define "keybroker.validate" -}}
{{- $replicated := or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled -}}
{{- if and $replicated (not .Values.registry.postgres.existingSecret) -}}
{{- fail "replicaCount > 1 (or autoscaling) needs a PostgreSQL registry: set registry.postgres.existingSecret. With SQLite each replica would have its own tenants and keys, and a revocation would reach only one of them." -}}
{{- end -}}
{{- if and $replicated (not (include "keybroker.keyringSecretName" .)) -}}
{{- fail "replicaCount > 1 (or autoscaling) needs keyring.existingSecret or keyring.json: every replica must hold the same platform keyring, or keys wrapped by one replica will not unwrap on another." -}}
{{- end -}}
{{- if .Values.tls.enabled -}}
{{- if and (not .Values.tls.existingSecret) (not (and .Values.tls.cert .Values.tls.key .Values.tls.ca)) -}}
{{- fail "tls.enabled needs a TLS Secret: set tls.existingSecret (keys tls.crt, tls.key, ca.crt), or tls.cert, tls.key and tls.ca." -}}
{{- end -}}
{{- if not .Values.authz.policy -}}
{{- fail "tls.enabled needs authz.policy: without a policy every caller with a certificate from the CA could unwrap every tenant's keys." -}}
{{- end -}}
{{- else if not .Values.authz.policy -}}
{{- fail "plaintext (tls.enabled=false) needs authz.policy: without a policy every caller on the network could call every method for every tenant. Grant the identity \"unauthenticated\" what the mesh in front of keybroker lets through." -}}
{{- end -}}
{{- end -}}
