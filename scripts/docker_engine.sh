#!/usr/bin/env bash
# Make sure a Docker engine answers (`make image`, the container tests): install docker.io and
# debootstrap from Debian if missing, then start dockerd as these machines allow it (no iptables,
# no bridge: containers use the host network). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get install -y -qq docker.io debootstrap >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq docker.io debootstrap >/dev/null; }
fi
if docker info >/dev/null 2>&1; then exit 0; fi
mkdir -p build/logs
nohup dockerd --iptables=false --bridge=none >build/logs/dockerd.log 2>&1 &
for _ in $(seq 1 60); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "dockerd did not start; see build/logs/dockerd.log:"; tail -20 build/logs/dockerd.log; exit 1
