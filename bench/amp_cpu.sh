#!/usr/bin/env bash
# bf16 on the CPU, the acceptance figures of issue 13 item 6:
#  1. accuracy: the MNIST demo (seed-cnn) trained twice at the same seed, in f32 and
#     with --amp bf16 (oneDNN bf16 primitives); prints both test accuracies (2,000
#     held-out digits) and their difference in points;
#  2. speed: build/bench/amp_cpu, f32 vs bf16 samples/s beside PyTorch CPU's
#     torch.autocast("cpu", dtype=torch.bfloat16) in the same run.
# Usage: bench/amp_cpu.sh [--build DIR] [--data-cache DIR] [--steps N (0: the full demo)]
#                         [--max-diff POINTS (exit 1 when |difference| is larger)] [--no-speed]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
build="$here/build" cache="$here/data" steps=0 max_diff="" speed=1
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build=$2; shift 2 ;;
    --data-cache) cache=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --max-diff) max_diff=$2; shift 2 ;;
    --no-speed) speed=0; shift ;;
    *) echo "amp_cpu.sh: unknown argument $1 (see the usage at the top of $0)" >&2; exit 2 ;;
  esac
done
bin="$build/launcher/dtrain"
[ -x "$bin" ] || { echo "amp_cpu.sh: $bin not found (build the dtrain target)" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Trains the demo; prints its test accuracy. $1: a name, the rest: extra flags.
train() {
  local name=$1
  shift
  "$bin" train --no-progress --seed 1 --max-steps "$steps" --data-cache "$cache" \
    --metrics "$tmp/$name.jsonl" --tensorboard none "$@" >"$tmp/$name.out" 2>&1 ||
    {
      cat "$tmp/$name.out" >&2
      # 77: CTest's SKIP_RETURN_CODE (a CPU without AVX512-BF16/AMX; the message says so)
      grep -q 'needs AVX512-BF16 or AMX' "$tmp/$name.out" && exit 77
      echo "amp_cpu.sh: the $name run failed" >&2
      exit 1
    }
  if grep -q GENERATED "$tmp/$name.out"; then
    echo "amp_cpu.sh: no MNIST in $cache (the demo fell back to generated data)" >&2
    exit 1
  fi
  python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["test_accuracy"])' \
    "$tmp/$name.jsonl"
}

f32=$(train f32)
bf16=$(train bf16 --amp bf16)
grep '^amp:' "$tmp/bf16.out" || true
python3 - "$f32" "$bf16" "$steps" "${max_diff:-none}" <<'PY'
import sys
f32, bf16, steps, max_diff = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
diff = 100 * (bf16 - f32)
run = "the full demo" if steps == "0" else f"{steps} steps"
print(f"seed-cnn on MNIST ({run}, seed 1): test accuracy f32 {100 * f32:.2f}%  "
      f"bf16 {100 * bf16:.2f}%  difference {diff:+.2f} points")
if max_diff != "none" and abs(diff) > float(max_diff):
    sys.exit(f"amp_cpu.sh: |difference| {abs(diff):.2f} > {max_diff} points")
PY
if [ "$speed" = 1 ]; then
  "$build/bench/amp_cpu"
fi
