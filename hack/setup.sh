#!/usr/bin/env bash
# Prepares a fresh Debian machine: system packages the tests use, then a
# virtualenv in .venv with waso and its test and dev extras.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# redis-server: the rate-limit tests; openssl: the local cluster's certificates; libmagic1: neonize.
# The local node: runc, CNI plugins, iptables and conntrack (kube-proxy), iproute2 (the node's veth).
# The image: buildah (and podman to run it by hand), debootstrap for a base without a registry, python3-venv
# for the wheelhouse (built with Debian's Python, the image's).
packages=(redis-server openssl libmagic1 util-linux iproute2 runc containernetworking-plugins iptables conntrack
          buildah podman debootstrap python3-venv)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  echo "[setup] installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The tests start their own redis-server on a free port; the Debian service is not needed.
if command -v systemctl >/dev/null && systemctl is-active --quiet redis-server 2>/dev/null; then
  ${sudo:-} systemctl stop redis-server || true
fi

command -v go >/dev/null || { echo "[setup] Go 1.26 is required to build the control plane (make tools)" >&2; exit 1; }

python="${PYTHON:-python3}"
if [[ ! -x "$root/.venv/bin/python" ]]; then
  "$python" -m venv "$root/.venv"
fi
"$root/.venv/bin/pip" install -q --upgrade pip
"$root/.venv/bin/pip" install -q -e "$root[test,dev]"
echo "[setup] ready: .venv with $("$root/.venv/bin/python" --version)" >&2
