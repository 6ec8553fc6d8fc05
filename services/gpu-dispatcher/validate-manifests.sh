#!/usr/bin/env bash
# Schema-validate deploy/gpu-dispatcher/ and deploy/gpu-dispatcher/local/ offline: installs the PyPI package kubernetes-validate
# into ~/.cache/taskbus-kv-venv (or $TASKBUS_KV_VENV) when missing, then runs the manifest test,
# which renders the kustomization with `kubectl kustomize` and validates it, and a Job the
# Kubernetes backend builds, strictly (unknown fields fail) against Kubernetes 1.33, on top of
# its structural checks (flags against --help, RBAC against jobs::RBAC_RULES, network policies).
#
#   services/gpu-dispatcher/validate-manifests.sh      # from anywhere; needs python3, kubectl
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${TASKBUS_KV_VENV:-$HOME/.cache/taskbus-kv-venv}"
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q kubernetes-validate
fi
TASKBUS_KV_VENV="$venv" TASKBUS_REQUIRE_KUBE_VALIDATE=1 \
  cargo test -p taskbus-gpu-dispatcher --test manifests
