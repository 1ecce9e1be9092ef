#!/usr/bin/env bash
# Builds waso's one image from the Containerfile and exports it as an archive that the local
# node's containerd imports (`ctr -n k8s.io images import bin/waso-image.tar`).
#
#  1. The wheelhouse: waso's wheel in dist/waso, its dependencies' in dist/wheels, made on the
#     host with the host's pip configuration. pip runs on Debian's python3, the image's interpreter
#     (3.11.2), not on the .venv's: dependencies are resolved for it (redis needs async-timeout
#     below 3.11.3; soupsieve 3.0.2 and later need 3.11.5, so the .venv's versions cannot be
#     pinned). Dependencies are fetched again only when waso's dependencies in pyproject.toml
#     change (rm -r dist to refresh them).
#  2. Without a registry (buildah): a Debian bookworm base made once with debootstrap from the
#     mirror apt uses, imported as localhost/waso-base:bookworm.
#     With a Docker engine and no buildah: docker build on the registry's bookworm-slim.
#  3. The image (localhost/waso:dev), then the archive, whose image is named
#     docker.io/library/waso:dev: the name containerd gives `waso:dev`, the chart's image.
#
# Environment: IMAGE (waso:dev), ARCHIVE (bin/waso-image.tar), BUILDER (buildah|docker, by
# default buildah if installed, else docker if its engine answers), DEBIAN_MIRROR (default:
# apt's), REBUILD_BASE=1 (debootstrap again), STORAGE_DRIVER (podman/buildah storage, e.g. vfs
# where overlay does not work), SOURCE_URL (the source label; default: git remote origin),
# SMOKE=0 (skip the test run of the image with podman), WHEEL_PYTHON (/usr/bin/python3: the
# interpreter that resolves the wheelhouse, CPython 3.11 on Linux like the image's).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

image="${IMAGE:-waso:dev}"
archive="${ARCHIVE:-bin/waso-image.tar}"
base="localhost/waso-base:bookworm"
wheels="dist/wheels"
wheel_python="${WHEEL_PYTHON:-/usr/bin/python3}"
say() { echo "[image] ${SECONDS}s: $*" >&2; }
die() { say "$*"; exit 1; }

# containerd (and the kubelet) name images in full: waso:dev is docker.io/library/waso:dev.
first="${image%%/*}"
if [[ "$image" != */* ]]; then
  full_ref="docker.io/library/$image"
elif [[ "$first" == *.* || "$first" == *:* || "$first" == localhost ]]; then
  full_ref="$image"
else
  full_ref="docker.io/$image"
fi
local_ref="$image"
[[ "$image" == */* ]] || local_ref="localhost/$image"

builder="${BUILDER:-}"
if [[ -z "$builder" ]]; then
  if command -v buildah >/dev/null; then
    builder=buildah
  elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    builder=docker
  else
    die "no image builder: install buildah, podman, runc and debootstrap (Debian), or run a Docker engine"
  fi
fi

"$wheel_python" -c 'import platform, sys; sys.exit(sys.version_info[:2] != (3, 11) or platform.system() != "Linux")' ||
  die "$wheel_python is not CPython 3.11 on Linux, the image's Python: set WHEEL_PYTHON to one (Debian bookworm's python3 is)"
version="$("$wheel_python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
source_url="${SOURCE_URL:-$(git remote get-url origin 2>/dev/null || true)}"

# 1. Wheelhouse.
mkdir -p "$wheels" dist/waso "$(dirname "$archive")"
[[ -x dist/wheel-venv/bin/pip ]] || "$wheel_python" -m venv dist/wheel-venv ||
  die "cannot make a virtualenv with $wheel_python (Debian: apt-get install python3-venv)"
pip="dist/wheel-venv/bin/pip"
stamp="$(dist/wheel-venv/bin/python -c 'import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(sys.version, sorted(project["dependencies"]))' | sha256sum | cut -d' ' -f1)"
# waso itself from a clean copy of its sources: an in-tree build would pick up stale modules
# from build/. Its date is the last commit's, so unchanged sources give the same wheel bytes
# (and the builder's layer cache holds).
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
tar -c --exclude=__pycache__ pyproject.toml README.md waso | tar -C "$src" -x
export SOURCE_DATE_EPOCH="$(git log -1 --format=%ct 2>/dev/null || date +%s)"
rm -f dist/waso/*.whl
if [[ "$(cat dist/wheels.stamp 2>/dev/null)" == "$stamp" ]]; then
  say "wheelhouse: dependencies unchanged, building waso $version"
  "$pip" wheel -q --disable-pip-version-check --no-deps --wheel-dir dist/waso "$src"
else
  say "wheelhouse: waso $version and its dependencies"
  rm -rf "$wheels" dist/wheels.stamp
  "$pip" wheel -q --disable-pip-version-check --wheel-dir "$wheels" "$src"
  mv "$wheels"/waso-*.whl dist/waso/
  echo "$stamp" >dist/wheels.stamp
fi

build_args=(--build-arg "VERSION=$version" --build-arg "REVISION=$revision" --build-arg "SOURCE=$source_url")

if [[ "$builder" == docker ]]; then
  # 2-3 with a Docker engine: the registry's base image.
  say "docker build $full_ref"
  docker build -f Containerfile "${build_args[@]}" -t "$full_ref" .
  rm -f "$archive"
  docker save -o "$archive" "$full_ref"
  size="$(docker image inspect --format '{{.Size}}' "$full_ref")"
else
  # 2. The debootstrap base, made once.
  command -v podman >/dev/null || die "podman is needed to import the debootstrap base"
  if [[ "${REBUILD_BASE:-0}" == 1 ]] || ! podman image exists "$base"; then
    command -v debootstrap >/dev/null || die "debootstrap is not installed"
    mirror="${DEBIAN_MIRROR:-}"
    if [[ -z "$mirror" ]]; then
      # The first Debian URI that apt uses for bookworm itself (not -security/-updates).
      sources=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources)
      mirror="$(cat "${sources[@]}" 2>/dev/null | awk '
        /^[[:space:]]*deb[[:space:]]/ { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i ~ /:\/\//) { if ($(i + 1) == "bookworm") { print $i; exit } break } }
        /^URIs:/ { uri = $2 } /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm" && uri != "") { print uri; exit } }
        /^[[:space:]]*$/ { uri = "" }' || true)"
      mirror="${mirror:-http://deb.debian.org/debian}"
    fi
    say "debootstrap bookworm from $mirror (once; REBUILD_BASE=1 to redo)"
    rootfs="$(mktemp -d /var/tmp/waso-base.XXXXXX)"
    trap 'rm -rf "$src" "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libmagic1 \
      bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log" >&2; die "debootstrap failed"; }
    rm -f "$rootfs.log"
    # Slim like the registry's bookworm-slim: no documentation (but the copyrights), manual
    # pages or translations, now or from packages installed later; no package caches.
    printf 'path-exclude /usr/share/%s\n' 'doc/*' 'groff/*' 'info/*' 'linda/*' 'lintian/overrides/*' \
      'locale/*' 'man/*' >"$rootfs/etc/dpkg/dpkg.cfg.d/slim"
    echo 'path-include /usr/share/doc/*/copyright' >>"$rootfs/etc/dpkg/dpkg.cfg.d/slim"
    (
      cd "$rootfs/usr/share"  # never the host's
      find doc -mindepth 1 ! -type d ! -name copyright -delete
      find doc -mindepth 1 -type d -empty -delete
      rm -rf groff/* info/* linda/* lintian/overrides/* locale/* man/*
    )
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
      "$rootfs"/var/log/* "$rootfs"/dev/*
    tar -C "$rootfs" --numeric-owner -c . | podman import --quiet \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
    rm -rf "$rootfs"
  fi
  # 3. The image and its archive.
  # The dependencies' stage is tagged, so that pruning the stale images of earlier builds
  # (untagged, with waso's title label) keeps it as the next build's cache.
  say "buildah bud $local_ref"
  buildah bud --isolation chroot --layers --quiet -f Containerfile --build-arg "BASE=$base" \
    --target deps -t localhost/waso-build:deps .
  buildah bud --isolation chroot --layers -f Containerfile --build-arg "BASE=$base" "${build_args[@]}" \
    -t "$local_ref" .
  podman image prune -f --filter label=org.opencontainers.image.title=waso >/dev/null
  say "exporting $archive"
  rm -f "$archive"
  buildah push --quiet "$local_ref" "oci-archive:$archive:$full_ref" >/dev/null
  size="$(podman image inspect --format '{{.Size}}' "$local_ref")"
  if [[ "${SMOKE:-1}" != 0 ]]; then
    # The pods' conditions: uid 65532, read-only root file system, no network.
    podman run --rm --runtime runc --cgroup-manager cgroupfs --ulimit nofile=1024:1024 \
      --ulimit nproc=4096:4096 --network none --user 65532:65532 --read-only \
      "$local_ref" --help >/dev/null || die "the image does not run: podman run $local_ref --help"
  fi
fi

say "$full_ref: $((size / 1000000)) MB ($size bytes); archive $archive $(du -h "$archive" | cut -f1)"
say "load it into the node: ctr -n k8s.io images import $archive"
