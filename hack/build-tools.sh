#!/usr/bin/env bash
# Builds the local control plane and helm from the Go module proxy into bin/.
#
# Every binary reports its real version (stamped through ldflags where the
# upstream build does the same). A binary is rebuilt only when the version it
# reports differs from the pin in hack/versions.env.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=versions.env
source "$root/hack/versions.env"
bin="$root/bin"
mkdir -p "$bin"
export GOFLAGS="-trimpath -buildvcs=false"

log() { printf '[build-tools] %s\n' "$*" >&2; }

reports_version() {  # binary, version-flag, expected
  [[ -x "$bin/$1" ]] && "$bin/$1" $2 2>/dev/null | grep -qF -- "$3"
}

build_kubernetes() {
  local wanted=() name
  for name in kube-apiserver kube-controller-manager kube-scheduler; do
    reports_version "$name" --version "Kubernetes $KUBERNETES_VERSION" || wanted+=("$name")
  done
  reports_version kubectl "version --client" "Client Version: $KUBERNETES_VERSION" || wanted+=(kubectl)
  if ((${#wanted[@]} == 0)); then log "kubernetes $KUBERNETES_VERSION: up to date"; return; fi

  local minor ld="" pkg
  minor="$(cut -d. -f2 <<<"$KUBERNETES_VERSION")"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  log "kubernetes $KUBERNETES_VERSION: building ${wanted[*]}"
  local pkgs=()
  for name in "${wanted[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$name"); done
  (cd "$root/hack/tools/kubernetes" && go build -ldflags "-s -w$ld" -o "$bin/" "${pkgs[@]}")
}

build_etcd() {
  # etcd's version is a constant in go.etcd.io/etcd/api/v3/version: no ldflags needed.
  if reports_version etcd --version "etcd Version: ${ETCD_VERSION#v}"; then
    log "etcd $ETCD_VERSION: up to date"; return
  fi
  log "etcd $ETCD_VERSION: building"
  (cd "$root/hack/tools/etcd" && go build -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3)
}

build_helm() {
  if reports_version helm version "Version:\"$HELM_VERSION\""; then
    log "helm $HELM_VERSION: up to date"; return
  fi
  log "helm $HELM_VERSION: building"
  (cd "$root/hack/tools/helm" && go build \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
    -o "$bin/helm" helm.sh/helm/v3/cmd/helm)
}

build_etcd
build_kubernetes
build_helm
log "done: $(cd "$bin" && echo etcd kube-apiserver kube-controller-manager kube-scheduler kubectl helm)"
