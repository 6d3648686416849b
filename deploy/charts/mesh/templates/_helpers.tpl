{{/* Labels every object carries; meshctl's install/manifests.rs writes the same. */}}
{{- define "mesh.labels" -}}
app.kubernetes.io/part-of: mesh
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{- define "mesh.componentLabels" -}}
{{ include "mesh.labels" .root }}
app.kubernetes.io/name: {{ .name }}
{{- end }}

{{- define "mesh.image" -}}
{{ .root.Values.image.registry }}/{{ .name }}:{{ .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- end }}

{{- define "mesh.containerSecurity" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end }}
