#!/bin/bash
# A 2-host x 2-worker job on network namespaces (scripts/netns-hosts): one
# `dtrain launch --nnodes 2` per host, node 0 starting the coordinator on its own
# address with a token. With `kill-host`, every process of host 1 (its launcher and
# both workers) is SIGKILLed once a checkpoint past step KILL_AFTER is committed,
# and host 1's launch is started again, as a scheduler would restart a lost node.
#   netns_train.sh DTRAIN WORKDIR DATA_CACHE STEPS plain|kill-host [KILL_AFTER]
# Prints each node's output (prefixed "node0| " / "node1| ") and exits with node 0's
# status (node 1's when node 0 succeeded). Run inside `netns-hosts run 2 ...`.
set -u
dtrain=$1 work=$2 cache=$3 steps=$4 mode=$5 kill_after=${6:-40}
nh=$(dirname "$0")/../../scripts/netns-hosts
addr0=$("$nh" ip 0)
mkdir -p "$work"
cd "$work" || exit 1
node() {  # rank
  exec "$nh" exec "$NETNS_RUN" "$1" "$dtrain" launch --nnodes 2 --node-rank "$1" \
    --nproc-per-node 2 --coordinator "$addr0:29500" --token netns-secret --job-id netns \
    --connect-timeout 30 --max-restarts 3 --heartbeat-timeout 10 -- \
    dtrain train --epochs 1 --max-steps "$steps" --data-cache "$cache" \
    --ckpt-dir "$work/ckpt" --ckpt-every 20 --resume auto
}
node 0 > node0.log 2>&1 & n0=$!
node 1 > node1.log 2>&1 & n1=$!
if [ "$mode" = kill-host ]; then
  for _ in $(seq 600); do
    last=$(cat "$work/ckpt/latest" 2>/dev/null | grep -o '[0-9]*$' | sed 's/^0*//')
    [ -n "$last" ] && [ "$last" -ge "$kill_after" ] && break
    sleep 0.1
  done
  echo "killing host 1 (every process in $NETNS_RUN-h1) after checkpoint ${last:-none}"
  ip netns pids "$NETNS_RUN-h1" | xargs -r kill -9
  wait $n1
  node 1 > node1-restarted.log 2>&1 & n1=$!
fi
wait $n0; r0=$?
wait $n1; r1=$?
for f in node0.log node1.log node1-restarted.log; do
  [ -f "$f" ] && sed "s/^/${f%.log}| /" "$f"
done
[ $r0 -ne 0 ] && exit $r0
exit $r1
