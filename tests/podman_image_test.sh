#!/usr/bin/env bash
# The CPU container image (deploy/docker/Dockerfile.cpu) built from local content with
# podman and a 2-worker job run in it, against the same job run outside.
#
#   podman_image_test.sh DTRAIN_BIN SOURCE_DIR WORK_DIR DATA_CACHE
#
# 1. Base image: no container registry is needed. debootstrap --variant=minbase makes
#    a Debian root file system of this host's release from the apt mirror this host
#    uses, with the runtime packages included (cached in WORK_DIR/base-cache by the
#    package list, so a rerun skips it), and `podman import` turns it into an image.
# 2. Install tree: DTRAIN_BIN (the suite's build) is copied to dist/opt/dtrain/bin and
#    deploy/docker/runtime-deps.sh lists the packages its libraries come from (and
#    copies the ones no package owns, e.g. a CUDA toolkit's, to opt/dtrain/lib).
# 3. `podman build --pull=never --network=none --build-context build=dist` builds the
#    Dockerfile's runtime stage unchanged, on that base, from that tree: the stage that
#    compiles is replaced, and with the packages already in the base no apt-get runs.
# 4. In the image: `ldd dtrain` finds every library, and there is no compiler and no
#    -dev package.
# 5. The oracle: `dtrain launch --nproc 2 -- dtrain train` (tcp, fixed seed, 200 steps)
#    on this host. The same job (a) in one container (dtrain launch, two workers) and
#    (b) as three containers on a podman network (coordinator + two workers, wired
#    like deploy/docker/compose.yaml) must write the same metrics, every loss to the
#    last digit and the test accuracy (timings and the data path left out).
#
# Exit 77 (skipped) with the reason where podman cannot run here (not installed, not
# root, `podman info` fails, no OCI runtime starts a container). Everything the test
# made (containers, network, images, the root file system) goes at exit, failure too.
set -euo pipefail

if [ $# -ne 4 ]; then
  echo "usage: $0 DTRAIN_BIN SOURCE_DIR WORK_DIR DATA_CACHE" >&2
  exit 2
fi
BIN=$1 SRC=$2 WORK=$3 DATA_CACHE=$4
T0=$SECONDS
log() { printf '[podman test %3ds] %s\n' $((SECONDS - T0)) "$*"; }
skip() { echo "SKIPPED: $*"; exit 77; }
die() { echo "FAILED: $*" >&2; exit 1; }

# ---- can podman run here? ----
command -v podman >/dev/null 2>&1 || skip "podman is not installed (scripts/bootstrap.sh installs it)"
if [ "$(id -u)" -ne 0 ]; then
  if ! grep -q "^$(id -un):" /etc/subuid 2>/dev/null; then
    skip "not root and no /etc/subuid entry for $(id -un): podman cannot run containers"
  fi
  skip "not root: the base image is made with debootstrap, which needs root"
fi
if ! info_err=$(podman info 2>&1 >/dev/null); then
  skip "podman info fails: $(printf '%s' "$info_err" | tail -n1)"
fi
command -v debootstrap >/dev/null 2>&1 || die "debootstrap is not installed (scripts/bootstrap.sh installs it)"
[ -x "$BIN" ] || die "no dtrain binary at $BIN"

ID="dtrain-test-$$-$RANDOM"
BASE_IMG="localhost/$ID-base:latest"
IMG="localhost/$ID-cpu:latest"
NET="$ID-net"
CONTAINERS=()
PODMAN=(podman)
RUN_OPTS=()
ROOTFS="$WORK/rootfs"

cleanup() {
  local rc=$?
  set +e
  for c in "${CONTAINERS[@]}"; do "${PODMAN[@]}" rm -f -t 0 "$c" >/dev/null 2>&1; done
  podman network rm -f "$NET" >/dev/null 2>&1
  podman rmi -f "$IMG" >/dev/null 2>&1
  podman rmi -f "$BASE_IMG" >/dev/null 2>&1
  # debootstrap mounts /proc and /sys in the target; never delete through a mount.
  if [ -d "$ROOTFS" ]; then
    awk -v r="$ROOTFS/" 'index($2, r) == 1 {print $2}' /proc/self/mounts | sort -r |
      while read -r m; do umount -l "$m"; done
    rm -rf --one-file-system "$ROOTFS"
  fi
  rm -rf "$WORK/dist" "$WORK/ctx"
  log "cleaned up (exit $rc)"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

rm -rf "$WORK/dist" "$WORK/ctx" "$WORK/out"
mkdir -p "$WORK/base-cache" "$WORK/ctx" "$WORK/out/host" "$WORK/out/one" "$WORK/out/net"

# ---- the data: the demo's MNIST subset (or its labelled generated fallback) ----
data_line=$("$BIN" data mnist --dir "$DATA_CACHE" 2>/dev/null | tail -n1)
DATA_DIR=${data_line%%: *}
[ -f "$DATA_DIR/train-images-idx3-ubyte" ] || die "dtrain data mnist gave no IDX folder: $data_line"
log "data: $data_line"

STEPS=200
train_args=(--data /data --backend tcp --seed 7 --epochs 2 --max-steps "$STEPS" --no-progress
  --log-every 10)

# ---- the oracle, in the background while the base image is made ----
(
  cd "$WORK/out/host"
  "$BIN" launch --nproc 2 -- "$BIN" train "${train_args[@]/#\/data/$DATA_DIR}" \
    --metrics "$WORK/out/host/metrics.jsonl" >"$WORK/out/host/log.txt" 2>&1
) &
oracle_pid=$!

# ---- install tree and the packages it needs ----
mkdir -p "$WORK/dist/opt/dtrain/bin"
cp "$BIN" "$WORK/dist/opt/dtrain/bin/dtrain"
sh "$SRC/deploy/docker/runtime-deps.sh" "$WORK/dist/opt/dtrain"
PKGS=$(tr '\n' ' ' <"$WORK/dist/opt/dtrain/share/dtrain/runtime-packages.txt")
bundled=$(cd "$WORK/dist/opt/dtrain/lib" && ls)
log "runtime packages: $PKGS"
[ -z "$bundled" ] || log "libraries no package owns, bundled in opt/dtrain/lib: $(echo $bundled)"

# ---- base image: debootstrap of this host's release, from the mirror apt uses ----
. /etc/os-release
SUITE=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}
MIRROR=${DTRAIN_DEBIAN_MIRROR:-}
if [ -z "$MIRROR" ]; then
  MIRROR=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
    awk '/^URIs:/ {u=$2} /^Suites:/ && u != "" && $0 ~ (" '"$SUITE"'( |$)") {print u; exit}')
fi
if [ -z "$MIRROR" ]; then
  MIRROR=$(awk '$1 == "deb" && $3 == "'"$SUITE"'" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
fi
MIRROR=${MIRROR:-http://deb.debian.org/debian}
key=$(printf '%s %s %s' "$SUITE" "$MIRROR" "$PKGS" | sha256sum | cut -c1-16)
base_tar="$WORK/base-cache/$SUITE-$key.tar"
if [ ! -f "$base_tar" ]; then
  log "debootstrap --variant=minbase $SUITE from $MIRROR (with the runtime packages)"
  rm -f "$WORK"/base-cache/*.tar
  rm -rf --one-file-system "$ROOTFS"
  if ! debootstrap --variant=minbase --include="$(echo $PKGS | tr ' ' ',')" \
      "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
    tail -n 20 "$WORK/debootstrap.log" >&2
    die "debootstrap failed (log: $WORK/debootstrap.log)"
  fi
  rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
  tar -C "$ROOTFS" -cf "$base_tar.tmp" . && mv "$base_tar.tmp" "$base_tar"
  rm -rf --one-file-system "$ROOTFS"
else
  log "base root file system cached: $base_tar"
fi
podman import -q "$base_tar" "$BASE_IMG" >/dev/null
log "imported $BASE_IMG"

# ---- an OCI runtime that starts containers here ----
# crun refuses hybrid cgroup hierarchies, and podman raises RLIMIT_NOFILE/NPROC for root
# containers, which a root without CAP_SYS_RESOURCE may not do: try runc, and limits
# pinned at (or below) this process's own.
probe_err=""
runtime_ok=""
pinned=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)"
  --ulimit "nproc=$(( $(ulimit -Hu) < 32768 ? $(ulimit -Hu) : 32768 )):$(( $(ulimit -Hu) < 32768 ? $(ulimit -Hu) : 32768 ))")
for rt in "" runc crun; do
  cmd=(podman)
  if [ -n "$rt" ]; then
    command -v "$rt" >/dev/null 2>&1 || continue
    cmd=(podman --runtime "$rt")
  fi
  for limits in no pinned; do
    opts=()
    [ "$limits" = no ] || opts=("${pinned[@]}")
    if err=$("${cmd[@]}" run --rm --network=none "${opts[@]}" "$BASE_IMG" true 2>&1); then
      PODMAN=("${cmd[@]}")
      RUN_OPTS=("${opts[@]}")
      runtime_ok="${rt:-default} runtime${opts[*]:+, ${opts[*]}}"
      break 2
    fi
    probe_err="${rt:-default runtime}: $(printf '%s' "$err" | tail -n1)"
  done
done
[ -n "$runtime_ok" ] || skip "podman cannot start a container here ($probe_err)"
log "OCI runtime: $runtime_ok"

# ---- the image: Dockerfile.cpu's runtime stage, fed the install tree ----
"${PODMAN[@]}" build --pull=never --network=none --layers=false \
  --build-arg BASE_IMAGE="$BASE_IMG" --build-context build="$WORK/dist" \
  -f "$SRC/deploy/docker/Dockerfile.cpu" -t "$IMG" "$WORK/ctx" >"$WORK/build.log" 2>&1 ||
  { cat "$WORK/build.log" >&2; die "podman build failed"; }
log "built $IMG ($(podman image inspect -f '{{.Size}}' "$IMG" | awk '{printf "%.0f MB", $1/1e6}'))"

# ---- what the image holds ----
missing=$("${PODMAN[@]}" run --rm --network=none "${RUN_OPTS[@]}" "$IMG" sh -c 'ldd "$(command -v dtrain)"' |
  grep 'not found' || true)
[ -z "$missing" ] || die "libraries missing in the image: $missing"
dev=$("${PODMAN[@]}" run --rm --network=none "${RUN_OPTS[@]}" "$IMG" sh -c \
  'for c in cc gcc g++ c++ cmake ninja; do command -v $c; done;
   dpkg-query -W -f "\${Package}\n" | grep -E -- "-dev$" || true')
[ -z "$dev" ] || die "the runtime image holds build tools: $(echo $dev)"
log "image: ldd finds every library; no compiler, no -dev package"

wait "$oracle_pid" || { cat "$WORK/out/host/log.txt" >&2; die "the host job failed"; }
log "host job: $(grep -o 'final loss.*accuracy [0-9.]*' "$WORK/out/host/log.txt")"

# Metrics without what may differ between runs: timings, and the data folder's name.
normalize() {
  sed -E 's/"(samples_per_s|train_seconds|data)":("[^"]*"|[^,}]*),?//g' "$1"
}
compare() {  # name metrics.jsonl log
  [ -s "$2" ] || { cat "$3" >&2; die "$1: no metrics written"; }
  if ! diff <(normalize "$WORK/out/host/metrics.jsonl") <(normalize "$2") >"$WORK/out/$1.diff"; then
    cat "$WORK/out/$1.diff" >&2
    die "$1: metrics differ from the host run (above: < host, > container)"
  fi
  log "$1: $(grep -o 'final loss.*accuracy [0-9.]*' "$3"), the same $(wc -l <"$2") metrics lines"
}

# ---- (a) one container, dtrain launch with two workers ----
c="$ID-one"
CONTAINERS+=("$c")
"${PODMAN[@]}" run "${RUN_OPTS[@]}" --name "$c" --network=none --shm-size=256m \
  -v "$DATA_DIR:/data:ro" -v "$WORK/out/one:/out" "$IMG" \
  dtrain launch --nproc 2 -- dtrain train "${train_args[@]}" --metrics /out/metrics.jsonl \
  >"$WORK/out/one/log.txt" 2>&1 || { cat "$WORK/out/one/log.txt" >&2; die "the one-container job failed"; }
compare one-container "$WORK/out/one/metrics.jsonl" "$WORK/out/one/log.txt"

# ---- (b) coordinator + two worker containers on a podman network ----
podman network create "$NET" >/dev/null 2>"$WORK/out/net/network.log" ||
  { cat "$WORK/out/net/network.log" >&2; die "podman network create failed"; }
CONTAINERS+=("$ID-coordinator" "$ID-worker0" "$ID-worker1")
"${PODMAN[@]}" run "${RUN_OPTS[@]}" -d --log-driver k8s-file --name "$ID-coordinator" --network "$NET" --network-alias coordinator \
  -e DTRAIN_JOB_TOKEN="podman-$ID" \
  "$IMG" dtrain coordinator --bind 0.0.0.0 --port 29500 --world-size 2 >/dev/null
for r in 0 1; do
  "${PODMAN[@]}" run "${RUN_OPTS[@]}" -d --log-driver k8s-file --name "$ID-worker$r" --hostname "worker$r" \
    --network "$NET" --network-alias "worker$r" \
    -e DTRAIN_COORDINATOR=coordinator:29500 -e DTRAIN_RANK="$r" -e DTRAIN_WORLD_SIZE=2 \
    -e DTRAIN_TCP_BIND=0.0.0.0 -e DTRAIN_JOB_TOKEN="podman-$ID" \
    -v "$DATA_DIR:/data:ro" -v "$WORK/out/net:/out" "$IMG" \
    dtrain train "${train_args[@]}" --metrics "/out/metrics.rank$r.jsonl" >/dev/null
done
net_rc=0
for r in 0 1; do
  rc=$(timeout 240 podman wait "$ID-worker$r") || rc=timeout
  "${PODMAN[@]}" logs "$ID-worker$r" >"$WORK/out/net/worker$r.log" 2>&1 || true
  [ "$rc" = 0 ] || net_rc=1
done
"${PODMAN[@]}" logs "$ID-coordinator" >"$WORK/out/net/coordinator.log" 2>&1 || true
if [ "$net_rc" -ne 0 ]; then
  tail -n 30 "$WORK"/out/net/*.log >&2
  die "a worker container failed"
fi
compare network "$WORK/out/net/metrics.rank0.jsonl" "$WORK/out/net/worker0.log"

log "PASSED: the image's 2-worker jobs equal the host run"
