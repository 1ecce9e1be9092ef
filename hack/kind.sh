#!/usr/bin/env bash
# `make kind`: the demo's install on kind, for machines with a Docker engine.
#
# Builds the image with docker (hack/build-image.sh picks docker when a Docker engine
# answers), creates a kind cluster, loads the image into it, installs the chart with the
# simulator in auto-pair mode, applies the sample tenants and waits until every session
# is Ready. Machines without Docker (like the project's CI machines) use `make demo`,
# which runs the same chart on a local kubelet node.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cluster="${KIND_CLUSTER:-waso}"
PATH="$root/bin:$PATH"

for tool in docker kind helm kubectl; do
  command -v "$tool" >/dev/null || { echo "[kind] $tool is required (bin/ holds helm and kubectl after make tools)" >&2; exit 1; }
done
docker info >/dev/null 2>&1 || { echo "[kind] no Docker engine answers: use make demo on this machine" >&2; exit 1; }

BUILDER=docker bash "$root/hack/build-image.sh"
kind get clusters | grep -qx "$cluster" || kind create cluster --name "$cluster" --wait 120s
kind load docker-image waso:dev --name "$cluster"
context="kind-$cluster"
helm --kube-context "$context" upgrade --install waso "$root/charts/waso" -n waso-system --create-namespace \
  --set simulator.enabled=true --set simulator.autoPair=true --set simulator.firstDevice=11 \
  --set image.pullPolicy=Never --wait --timeout 5m
kubectl --context "$context" apply --server-side -f "$root/docs/samples"
kubectl --context "$context" wait --for=condition=Ready was --all -n acme --timeout=300s
kubectl --context "$context" wait --for=condition=Ready was --all -n globex --timeout=300s
kubectl --context "$context" get tq,was,pods -A
echo "[kind] done; remove it with: kind delete cluster --name $cluster"
