#!/bin/bash
# Weak scaling over namespaced hosts (scripts/netns-hosts): the demo training run
# with one worker per host and a fixed per-worker batch on 1, 2, 4 ... hosts, each
# host's link shaped with tbf to RATE, one `dtrain launch --nnodes N` per host (node 0
# starts the coordinator). Beside each row, the ring all-reduce busbw at the
# gradient bucket's size over the same shaped links (`dtrain bench hosts`).
#
#   bench/weak_scaling_hosts.sh [--hosts "1 2 4"] [--rate 1gbit] [--steps 60]
#                               [--batch 64] [--bytes 4194304] [--dtrain PATH]
#
# Columns: hosts, samples/s over the job, samples/s per worker, efficiency (per-worker
# samples/s against 1 host), same-cpu: samples/s of the same number of workers on ONE
# host (no link in between), link_eff: samples/s against same-cpu, busbw (GB/s) at
# --bytes and busbw / link rate. Needs root (network namespaces).
# The namespaced "hosts" share this machine's CPUs: N hosts run N workers on the same
# cores, so the efficiency falls with N even with a perfect link (2 cores: at most
# about 2/N of it). link_eff removes that: it is the cost of the shaped links alone,
# and busbw / line says how close the ring gets to the link rate.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
hosts="1 2 4" rate=1gbit steps=60 batch=64 bytes=4194304
dtrain=$root/build/launcher/dtrain
while [ $# -gt 0 ]; do
  case $1 in
    --hosts) hosts=$2; shift 2 ;; --rate) rate=$2; shift 2 ;; --steps) steps=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;; --bytes) bytes=$2; shift 2 ;; --dtrain) dtrain=$2; shift 2 ;;
    *) echo "weak_scaling_hosts: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
done
nh=$root/scripts/netns-hosts
"$nh" check
work=$(mktemp -d /tmp/dtrain-weak-XXXXXX)
trap 'rm -rf "$work"' EXIT
[ -n "${KEEP:-}" ] && trap - EXIT
# Fetch the demo data once, outside the namespaces (they have no route out).
(cd "$work" && "$dtrain" train --epochs 1 --max-steps 1 --data-cache "$work/data" >/dev/null 2>&1)

# samples/s of one N-host job (job.sh runs inside `netns-hosts run`).
train_hosts() {  # n [workers per node]
  local n=$1 per_node=${2:-1}
  # One host: a plain launch (with --nnodes 1, --coordinator would name a running one).
  local nodes=""
  [ "$n" -gt 1 ] && nodes="--nnodes $n --node-rank \$i --coordinator \$addr0:29500 --token bench"
  cat >"$work/job.sh" <<JOB
#!/bin/bash
addr0=\$("$nh" ip 0)
for i in \$(seq 0 $((n - 1))); do
  "$nh" exec "\$NETNS_RUN" "\$i" "$dtrain" launch $nodes --nproc-per-node $per_node \
    --job-id weak -- dtrain train --epochs 1 \
    --max-steps $steps --batch $batch --data-cache "$work/data" > "$work/node\$i.log" 2>&1 &
done
wait
JOB
  chmod +x "$work/job.sh"
  (cd "$work" && "$nh" run "$n" "$rate" "$work/job.sh")
  grep -o '([0-9.]* samples/s)' "$work/node0.log" | tail -1 | tr -d '(' | awk '{print $1}'
}

busbw_hosts() {  # n -> "busbw line"
  local n=$1
  [ "$n" -lt 2 ] && { echo "- -"; return; }
  "$dtrain" bench hosts --hosts "$n" --ranks-per-host 1 --rate "$rate" --algos ring \
    --min-bytes "$bytes" --max-bytes "$bytes" 2>/dev/null |
    awk -v b="$bytes" '$1 == b {print $(NF-2), $(NF-1)}' | tail -1
}

printf '%6s %12s %12s %10s %10s %9s %12s %8s\n' hosts samples/s per-worker efficiency \
  same-cpu link_eff busbw_GB/s line
base=""
for n in $hosts; do
  sps=$(train_hosts "$n")
  [ -z "$sps" ] && { echo "weak_scaling_hosts: the $n-host job printed no samples/s; its node 0 log:" >&2; cat "$work/node0.log" >&2; exit 1; }
  per=$(awk -v s="$sps" -v n="$n" 'BEGIN{printf "%.1f", s / n}')
  [ -z "$base" ] && base=$per
  eff=$(awk -v p="$per" -v b="$base" 'BEGIN{printf "%.2f", p / b}')
  same=$sps
  [ "$n" -gt 1 ] && same=$(train_hosts 1 "$n")
  leff=$(awk -v s="$sps" -v c="$same" 'BEGIN{printf "%.2f", (c > 0) ? s / c : 0}')
  read -r bw line <<<"$(busbw_hosts "$n")"
  printf '%6s %12s %12s %10s %10s %9s %12s %8s\n' "$n" "$sps" "$per" "$eff" "$same" "$leff" \
    "${bw:--}" "${line:--}"
done
echo "link rate $rate per host (tbf); per-worker batch $batch, $steps steps; busbw at $bytes B"
