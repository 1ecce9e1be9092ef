#!/usr/bin/env bash
# Builds the local control plane, the node (kubelet, kube-proxy, containerd,
# CoreDNS, the pause image), helm, the tests' MongoDB server (FerretDB),
# promtool (the alert rules' tests) and krew (a test installs the kubectl plugin
# with it) from the Go module proxy into bin/.
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
die() { log "error: $*"; exit 1; }

reports_version() {  # binary, version-flag, expected
  # Output captured, not piped to `grep -q`: under pipefail, grep exiting at the
  # first match can kill the binary with SIGPIPE and fail a current binary.
  local out
  [[ -x "$bin/$1" ]] || return 1
  out="$("$bin/$1" $2 2>/dev/null || true)"
  [[ "$out" == *"$3"* ]]
}

require_pin() {  # tool directory, module, pinned version: the go.mod must require the pin
  local required
  required="$(cd "$root/hack/tools/$1" && go list -m -f '{{.Version}}' "$2")"
  [[ "$required" == "$3" ]] ||
    die "hack/tools/$1/go.mod requires $2 $required but hack/versions.env pins $3"
}

build_kubernetes() {
  # The checks run in parallel: each of these large binaries takes a while to start.
  local names=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)
  local wanted=() checks=() name i
  for name in "${names[@]}"; do
    if [[ "$name" == kubectl ]]; then
      reports_version kubectl "version --client" "Client Version: $KUBERNETES_VERSION" &
    else
      reports_version "$name" --version "Kubernetes $KUBERNETES_VERSION" &
    fi
    checks+=("$!")
  done
  for i in "${!names[@]}"; do wait "${checks[$i]}" || wanted+=("${names[$i]}"); done
  if ((${#wanted[@]} == 0)); then log "kubernetes $KUBERNETES_VERSION: up to date"; return; fi
  require_pin kubernetes k8s.io/kubernetes "$KUBERNETES_VERSION"

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
  require_pin etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
  log "etcd $ETCD_VERSION: building"
  (cd "$root/hack/tools/etcd" && go build -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3)
}

build_ferretdb() {
  # `ferretdb --version` prints the embedded build/version/version.txt, which
  # FerretDB's Taskfile writes with `git describe` and its module does not ship:
  # built from the module as it is, the binary panics at start (FerretDB issue
  # 2982). ldflags cannot set an embedded file, and -overlay may not replace one
  # in the module cache, so the build uses a copy of the module source (verified
  # against go.sum by `go mod download`) plus the version.txt `git describe`
  # gives at the tag. Like upstream's production build: no cgo, no debug tag;
  # ferretdb_no_postgresql leaves out the PostgreSQL backend (we run SQLite).
  if reports_version ferretdb --version "version: $FERRETDB_VERSION"; then
    log "ferretdb $FERRETDB_VERSION: up to date"; return
  fi
  local module=github.com/FerretDB/FerretDB
  require_pin ferretdb "$module" "$FERRETDB_VERSION"
  log "ferretdb $FERRETDB_VERSION: building"
  (
    work="$(mktemp -d)"
    trap 'chmod -R u+w "$work"; rm -rf "$work"' EXIT
    cd "$root/hack/tools/ferretdb"
    go mod download "$module"
    cp -R "$(go list -m -f '{{.Dir}}' "$module")" "$work/FerretDB"
    chmod -R u+w "$work/FerretDB"
    echo "$FERRETDB_VERSION" >"$work/FerretDB/build/version/version.txt"
    mkdir "$work/build"
    cp go.mod go.sum "$work/build/"
    cd "$work/build"
    go mod edit -replace "$module=../FerretDB"
    CGO_ENABLED=0 go build -tags ferretdb_no_postgresql -ldflags "-s -w" -o "$bin/ferretdb" "$module/cmd/ferretdb"
  )
}

# The Kubernetes version `helm template` assumes without a cluster. Upstream
# stamps its own client-go minor; we stamp the cluster's, so charts are
# rendered (and linted for deprecations) against the Kubernetes we run.
helm_kube_version() { echo "v1.$(cut -d. -f2 <<<"$KUBERNETES_VERSION").0"; }

helm_renders_for_pinned_kubernetes() {  # an unstamped helm renders for v1.20.0
  local chart rendered
  chart="$(mktemp -d)"
  mkdir "$chart/templates"
  printf 'apiVersion: v2\nname: probe\nversion: 0.0.0\n' >"$chart/Chart.yaml"
  printf 'kubeVersion: {{ .Capabilities.KubeVersion.Version }}\n' >"$chart/templates/probe.yaml"
  rendered="$("$bin/helm" template probe "$chart" 2>/dev/null || true)"
  rm -rf "$chart"
  [[ "$rendered" == *"kubeVersion: $(helm_kube_version)"* ]]
}

build_helm() {
  if reports_version helm version "Version:\"$HELM_VERSION\"" && helm_renders_for_pinned_kubernetes; then
    log "helm $HELM_VERSION: up to date"; return
  fi
  require_pin helm helm.sh/helm/v3 "$HELM_VERSION"
  local kube ld pkg
  kube="$(helm_kube_version)"
  ld="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ld+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$(cut -d. -f2 <<<"$kube")"
  done
  log "helm $HELM_VERSION: building (default Kubernetes version $kube)"
  (cd "$root/hack/tools/helm" && go build -ldflags "-s -w $ld" -o "$bin/helm" helm.sh/helm/v3/cmd/helm)
}

build_containerd() {
  # As containerd's Makefile: static, no man-page generator, the shim without gRPC.
  local module=github.com/containerd/containerd/v2 wanted=() shim=""
  reports_version containerd --version "$module $CONTAINERD_VERSION" || wanted+=("$module/cmd/containerd")
  reports_version ctr --version "$module $CONTAINERD_VERSION" || wanted+=("$module/cmd/ctr")
  reports_version containerd-shim-runc-v2 -v "Version:  $CONTAINERD_VERSION" || shim=yes
  if ((${#wanted[@]} == 0)) && [[ -z "$shim" ]]; then log "containerd $CONTAINERD_VERSION: up to date"; return; fi
  require_pin containerd "$module" "$CONTAINERD_VERSION"

  local ld="-s -w -X $module/version.Version=$CONTAINERD_VERSION"
  log "containerd $CONTAINERD_VERSION: building ${wanted[*]##*/} ${shim:+containerd-shim-runc-v2}"
  (
    cd "$root/hack/tools/containerd"
    export CGO_ENABLED=0
    if ((${#wanted[@]})); then
      go build -tags urfave_cli_no_docs -ldflags "$ld" -o "$bin/" "${wanted[@]}"
    fi
    if [[ -n "$shim" ]]; then
      go build -tags "urfave_cli_no_docs no_grpc" -ldflags "$ld" -o "$bin/" "$module/cmd/containerd-shim-runc-v2"
    fi
  )
}

build_coredns() {
  # hack/tools/coredns/main.go: CoreDNS with the cluster-DNS plugins only. The
  # version is a constant in coremain: no ldflags needed.
  if reports_version coredns -version "CoreDNS-${COREDNS_VERSION#v}"; then
    log "coredns $COREDNS_VERSION: up to date"; return
  fi
  require_pin coredns github.com/coredns/coredns "$COREDNS_VERSION"
  log "coredns $COREDNS_VERSION: building"
  (cd "$root/hack/tools/coredns" && CGO_ENABLED=0 go build -ldflags "-s -w" -o "$bin/coredns" .)
}

build_pause() {
  if reports_version pause -v "pause.go version $PAUSE_VERSION"; then
    log "pause $PAUSE_VERSION: up to date"; return
  fi
  log "pause $PAUSE_VERSION: building"
  (cd "$root/hack/tools/pause" && CGO_ENABLED=0 go build -ldflags "-s -w -X main.version=$PAUSE_VERSION" -o "$bin/pause" .)
}

# The pod sandbox image, as an OCI archive for `ctr -n k8s.io images import`:
# bin/pause alone, run as 65535:65535 like registry.k8s.io/pause.
build_pause_image() {
  local image="localhost/waso-pause:$PAUSE_VERSION" archive="$bin/pause.oci.tar" index=""
  if [[ -f "$archive" && ! "$bin/pause" -nt "$archive" ]]; then
    index="$(tar -xOf "$archive" index.json 2>/dev/null || true)"
  fi
  if [[ "$index" == *"\"$image\""* ]]; then log "pause image $image: up to date"; return; fi
  command -v buildah >/dev/null || die "buildah is missing (Debian package buildah; bash hack/setup.sh installs it)"

  log "pause image $image: building $archive"
  local container
  container="$(buildah from --name "waso-pause-build-$$" scratch)"
  if ! {
    buildah copy --quiet "$container" "$bin/pause" /pause >/dev/null &&
      buildah config --entrypoint '["/pause"]' --user 65535:65535 --os linux --arch amd64 "$container" &&
      buildah commit --quiet --rm --timestamp 0 "$container" "$image" >/dev/null
  }; then
    buildah rm "$container" >/dev/null 2>&1 || true
    die "buildah could not build $image"
  fi
  rm -f "$archive.tmp"
  buildah push --quiet "$image" "oci-archive:$archive.tmp:$image"
  buildah rmi "$image" >/dev/null
  mv "$archive.tmp" "$archive"
}

# Prometheus v3 releases are the module's v0.3XX.Y (v3.16.0 is v0.316.0): the
# release version promtool reports, from the module version pinned.
promtool_release() {
  local minor="${PROMTOOL_VERSION#v0.}"
  echo "3.$((${minor%%.*} - 300)).${minor#*.}"
}

build_promtool() {
  # As upstream's promu build (.promu.yml): netgo and builtinassets, no cgo, the
  # version stamped into github.com/prometheus/common/version. The module has
  # no git revision; the build records the module version instead.
  local release
  release="$(promtool_release)"
  if reports_version promtool --version "promtool, version $release "; then
    log "promtool $PROMTOOL_VERSION ($release): up to date"; return
  fi
  require_pin promtool github.com/prometheus/prometheus "$PROMTOOL_VERSION"
  local pkg=github.com/prometheus/common/version
  local ld="-s -w -X $pkg.Version=$release -X $pkg.Revision=$PROMTOOL_VERSION -X $pkg.Branch=HEAD"
  ld+=" -X $pkg.BuildUser=waso@build-tools -X $pkg.BuildDate=19700101-00:00:00"
  log "promtool $PROMTOOL_VERSION ($release): building"
  (cd "$root/hack/tools/promtool" && CGO_ENABLED=0 go build -tags "netgo builtinassets" -ldflags "$ld" \
    -o "$bin/promtool" github.com/prometheus/prometheus/cmd/promtool)
}

build_krew() {
  # krew stamps its version from git; here the module version is the tag.
  if reports_version krew version "GitTag            $KREW_VERSION"; then
    log "krew $KREW_VERSION: up to date"; return
  fi
  require_pin krew sigs.k8s.io/krew "$KREW_VERSION"
  local pkg=sigs.k8s.io/krew/internal/version
  log "krew $KREW_VERSION: building"
  (cd "$root/hack/tools/krew" && CGO_ENABLED=0 go build -ldflags "-s -w -X $pkg.gitTag=$KREW_VERSION -X $pkg.gitCommit=$KREW_VERSION" \
    -o "$bin/krew" sigs.k8s.io/krew/cmd/krew)
}

build_etcd
build_kubernetes
build_helm
build_containerd
build_coredns
build_ferretdb
build_promtool
build_krew
build_pause
build_pause_image
log "done: $(cd "$bin" && echo etcd kube-apiserver kube-controller-manager kube-scheduler kubectl helm \
  kubelet kube-proxy containerd ctr containerd-shim-runc-v2 coredns ferretdb promtool krew pause pause.oci.tar)"
