#!/usr/bin/env bash
# Schema-validate the scaler's Kubernetes manifests (deploy/scaler/, deploy/keda/) offline with
# the PyPI package kubernetes-validate (strict: unknown fields fail). Core kinds are checked
# against the Kubernetes OpenAPI schemas; KEDA's ScaledObject/ScaledJob and Kustomizations have
# no schema there (a warning) and are checked structurally by `cargo test -p taskbus-scaler
# --test manifests`, which also cross-checks ports, names and trigger metadata (and the
# partial Deployment patches external-metrics/https.yaml and direct/direct-mode.yaml).
#
#   services/scaler/validate-manifests.sh            # from anywhere; needs python3 and PyPI
#   K8S_VERSION=1.31.0 services/scaler/validate-manifests.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${TASKBUS_KV_VENV:-$HOME/.cache/taskbus-kv-venv}"
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q kubernetes-validate
fi
version="${K8S_VERSION:-1.33.0}"
if command -v kubectl >/dev/null 2>&1; then
  # Validate what would be applied: each kustomization rendered.
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' EXIT
  for k in deploy/scaler deploy/scaler/external-metrics deploy/scaler/direct deploy/keda; do
    kubectl kustomize "$k" >"$out/$(echo "$k" | tr / -).yaml"
  done
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "$out"/*.yaml deploy/keda/hpa-external.yaml
else
  echo "kubectl not found: validating the files one by one, without kustomize" >&2
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" deploy/scaler/base/*.yaml \
    deploy/scaler/external-metrics/{apiservice,external-metrics-rbac}.yaml \
    deploy/scaler/direct/direct-rbac.yaml deploy/keda/*.yaml
fi
echo "manifests valid (Kubernetes $version, strict)" >&2
