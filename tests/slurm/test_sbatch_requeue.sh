#!/bin/bash
# End to end: deploy/slurm on a real Slurm (slurm-wlm + munge) started here, in a
# temporary folder with its own slurm.conf and ports. The job (two ranks, CPU)
# gets SIGUSR1 mid-run through `scancel --signal=USR1 --batch`, the way
# `#SBATCH --signal=B:USR1@120` delivers it; it must commit a final checkpoint at
# the signal, requeue itself, resume from that checkpoint and finish COMPLETED with
# the same parameters (bit for bit) and test accuracy as an uninterrupted run
# (the oracle: the same training under `dtrain launch --nproc 2`).
#
#   tests/slurm/test_sbatch_requeue.sh DTRAIN_BIN SOURCE_DIR [NODES]
#
# NODES (default 2): Slurm node names on this one machine, one task each; Debian's
# slurmd is built without --enable-multiple-slurmd, so with 2 the second slurmd
# cannot start and the test goes on with one node running both tasks (it says so).
# Exit 77 (skip) when Slurm cannot run here: not root, or slurm-wlm/munge missing.
set -uo pipefail
BIN=$(realpath "${1:?dtrain binary}")
SRC=$(realpath "${2:?source folder}")
NODES=${3:-2}
skip() { echo "SKIP: $*"; exit 77; }
fail() { echo "FAIL: $*"; exit 1; }
[ "$(id -u)" = 0 ] || skip "slurmd must run as root (uid $(id -u))"
for c in munged slurmctld slurmd sbatch scontrol scancel srun; do
  command -v "$c" >/dev/null || skip "$c not found (apt-get install slurm-wlm munge)"
done

T=$(mktemp -d /tmp/dtrain-slurm-test.XXXXXX)
chmod 755 "$T"
export SLURM_CONF=$T/slurm.conf
JOB=
teardown() {
  if [ -n "$JOB" ]; then  # the job's tasks end with it, before the daemons do
    scancel "$JOB" 2>/dev/null
    for _ in $(seq 50); do
      case "$(job_field JobState)" in PENDING | RUNNING | REQUEUED | COMPLETING) sleep 0.2 ;; *) break ;; esac
    done
  fi
  for p in "$T"/slurmd-*.pid "$T"/slurmctld.pid "$T"/munge/munged.pid; do
    [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null
  done
  sleep 0.5
  for p in "$T"/slurmd-*.pid "$T"/slurmctld.pid "$T"/munge/munged.pid; do
    [ -f "$p" ] && kill -9 "$(cat "$p")" 2>/dev/null
  done
  if [ -n "${KEEP:-}" ]; then echo "kept $T"; else rm -rf "$T"; fi
}
trap teardown EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start_munge() {
  mkdir -p "$T/munge"
  chmod 700 "$T/munge"
  dd if=/dev/urandom of="$T/munge/munge.key" bs=1024 count=1 2>/dev/null
  chmod 400 "$T/munge/munge.key"
  munged --force --key-file="$T/munge/munge.key" --socket="$T/munge/munge.socket" \
    --pid-file="$T/munge/munged.pid" --log-file="$T/munge/munged.log" \
    --seed-file="$T/munge/munged.seed" || fail "munged did not start"
}

write_conf() {  # $1: number of node names
  local cpus mem i
  cpus=$(nproc)
  mem=1024
  cat >"$SLURM_CONF" <<CONF
ClusterName=dttest
SlurmctldHost=localhost
SlurmctldPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$T/munge/munge.socket
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool-%n
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd-%n.pid
SlurmctldLogFile=$T/slurmctld.log
SlurmdLogFile=$T/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
KillWait=15
CONF
  for i in $(seq "$1"); do
    echo "NodeName=n$i NodeAddr=127.0.0.1 Port=$(free_port) CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN" >>"$SLURM_CONF"
  done
  echo "PartitionName=dt Nodes=n[1-$1] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >>"$SLURM_CONF"
}

idle_nodes() { sinfo -h -N -o '%N %T' 2>/dev/null | grep -c -E ' (idle|mixed)$'; }

# Starts slurmctld and one slurmd per node name; echoes how many became idle.
start_slurm() {  # $1: number of node names
  write_conf "$1"
  mkdir -p "$T/state"
  slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start: $(tail -5 "$T/slurmctld.log")"
  for i in $(seq "$1"); do
    mkdir -p "$T/spool-n$i"
    slurmd -f "$SLURM_CONF" -N "n$i" 2>>"$T/slurmd-start.log"
  done
  for _ in $(seq 40); do
    [ "$(idle_nodes)" -ge "$1" ] && break
    sleep 0.5
  done
  idle_nodes
}

stop_slurm() {
  for p in "$T"/slurmd-*.pid "$T"/slurmctld.pid; do [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null; done
  sleep 1
  rm -rf "$T"/state "$T"/spool-* "$T"/slurm*.pid
}

job_field() { scontrol show job -o "$JOB" 2>/dev/null | grep -o "$1=[^ ]*" | cut -d= -f2; }

start_munge
UP=$(start_slurm "$NODES")
if [ "$UP" -lt "$NODES" ]; then
  echo "NOTE: only $UP of $NODES slurmd(s) came up on one machine (slurmd: $(head -c 300 "$T/slurmd-start.log" 2>/dev/null; tail -2 "$T"/slurmd-n2.log 2>/dev/null)); going on with one node and 2 tasks"
  stop_slurm
  NODES=1
  UP=$(start_slurm 1)
fi
[ "$UP" -ge 1 ] || fail "no slurmd came up: $(tail -5 "$T"/slurmd-n1.log "$T/slurmctld.log" 2>/dev/null)"
sinfo

TRAIN=(--model mlp --seed 7 --epochs 10 --log-every 10 --ckpt-every 1000 --data-cache "$SRC/data")
export DTRAIN="$BIN"

# The oracle: the same two-rank training, uninterrupted.
mkdir -p "$T/oracle"
"$BIN" launch --nproc 2 -- "$BIN" train --no-progress "${TRAIN[@]}" --ckpt-dir "$T/oracle/ckpt" \
  --save "$T/oracle/final.dtrn" --metrics "$T/oracle/metrics.jsonl" >"$T/oracle/out.txt" 2>&1 ||
  fail "oracle run failed: $(tail -20 "$T/oracle/out.txt")"
ORACLE_LINE=$(grep -o 'final loss [0-9.]*, test accuracy [0-9.]*' "$T/oracle/out.txt")
[ -n "$ORACLE_LINE" ] || fail "no summary in the oracle run: $(tail "$T/oracle/out.txt")"

# The job under test: the real script, submitted with sbatch.
mkdir -p "$T/job"
OUT="$T/job/slurm.out"
JOB=$(cd "$T/job" && DTRAIN_SLURM_DIR="$SRC/deploy/slurm" DTRAIN_CKPT_DIR="$T/job/ckpt" \
  sbatch --parsable --nodes="$NODES" --ntasks-per-node=$((2 / NODES)) --output="$OUT" \
  "$SRC/deploy/slurm/dtrain-cpu.sbatch" "${TRAIN[@]}" --save "$T/job/final.dtrn" \
  --metrics "$T/job/metrics.jsonl") || fail "sbatch failed"
echo "submitted job $JOB on $NODES node(s)"

# Mid-run: once training has logged a few steps, the batch shell gets SIGUSR1.
for _ in $(seq 600); do
  logged=$(grep -c '"step"' "$T/job/metrics.jsonl" 2>/dev/null)
  [ "${logged:-0}" -ge 3 ] && break
  [ "$(job_field JobState)" = FAILED ] && fail "job failed early: $(cat "$OUT")"
  sleep 0.1
done
scancel --signal=USR1 --batch "$JOB" || fail "scancel --signal=USR1 failed"
echo "sent SIGUSR1 to the batch shell of job $JOB"

# The first run ends FAILED (exit 75) for a moment before slurmctld requeues it, so
# only a final state after the requeue (Restarts=1) counts; a requeued job waiting
# for its BeginTime is started now.
STATE=
for _ in $(seq 1200); do
  STATE=$(job_field JobState)
  case "$STATE" in
    COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY)
      [ "$(job_field Restarts)" != 0 ] && break ;;
    PENDING) [ "$(job_field Reason)" = BeginTime ] && scontrol update JobId="$JOB" StartTime=now 2>/dev/null ;;
  esac
  sleep 0.1
done
echo "----- job output -----"
cat "$OUT"
echo "----- scontrol show job -----"
scontrol show job "$JOB"
echo "-----"

[ "$STATE" = COMPLETED ] || fail "job ended $STATE, expected COMPLETED"
[ "$(job_field ExitCode)" = 0:0 ] || fail "exit code $(job_field ExitCode), expected 0:0"
[ "$(job_field Restarts)" = 1 ] || fail "Restarts=$(job_field Restarts), expected 1 (one requeue)"
grep -q 'dtrain.sbatch: got SIGUSR1: forwarding it' "$OUT" || fail "the batch shell did not forward SIGUSR1"
STEP=$(grep -o 'rank 0: stopped by SIGUSR1 after step [0-9]*' "$OUT" | grep -o '[0-9]*$')
[ -n "$STEP" ] || fail "rank 0 did not stop on SIGUSR1"
STEP1=$(grep -o 'rank 1: stopped by SIGUSR1 after step [0-9]*' "$OUT" | grep -o '[0-9]*$')
[ "$STEP1" = "$STEP" ] || fail "rank 1 stopped after step '$STEP1', rank 0 after $STEP"
NAME=$(printf 'step-%08d' "$STEP")
grep -q "checkpoint $NAME committed" "$OUT" || fail "checkpoint $NAME was not committed"
grep -q 'training step exited 75' "$OUT" || fail "the step did not exit 75"
grep -q "requeueing job $JOB" "$OUT" || fail "the script did not requeue"
grep -q "job $JOB run 1:" "$OUT" || fail "no second run (SLURM_RESTART_COUNT=1)"
grep -q "resumed from $NAME" "$OUT" || fail "the second run did not resume from $NAME"
LINE=$(grep -o 'final loss [0-9.]*, test accuracy [0-9.]*' "$OUT")
[ "$LINE" = "$ORACLE_LINE" ] || fail "resumed job: '$LINE'; uninterrupted: '$ORACLE_LINE'"
cmp -s "$T/oracle/final.dtrn" "$T/job/final.dtrn" || fail "final parameters differ from the oracle's"
echo "PASS: stopped after step $STEP on SIGUSR1, requeued, resumed from $NAME, COMPLETED; $LINE (= uninterrupted)"
