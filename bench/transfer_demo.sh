#!/usr/bin/env bash
# Transfer learning demo: pretrain seed-cnn on digits 0-4, export its weights as
# safetensors, then train on digits 5-9 for the same small number of steps three
# times: from those weights with the conv base frozen and a fresh head, from those
# weights fine-tuning everything (fresh head), and from scratch. Prints the three
# test accuracies (on the 5-9 test digits of the demo's MNIST subset).
#
#   bench/transfer_demo.sh [STEPS (default 30)] [PRETRAIN_STEPS (default 300)]
#   DTRAIN=path/to/dtrain  (default build/launcher/dtrain)
set -euo pipefail
steps=${1:-30}
pre_steps=${2:-300}
dtrain=${DTRAIN:-build/launcher/dtrain}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
common=(--no-progress --epochs 100 --threads "${THREADS:-1}" --seed 1)

accuracy() { sed -n 's/.*test accuracy \([0-9.]*\).*/\1/p'; }

"$dtrain" train "${common[@]}" --classes 0-4 --max-steps "$pre_steps" --ckpt-dir "$work/pre" \
  --ckpt-every "$pre_steps" --metrics "$work/pre.jsonl" 2>/dev/null | accuracy >"$work/pre.acc"
"$dtrain" ckpt export "$work/pre" --out "$work/pre.safetensors" >/dev/null
transfer=$("$dtrain" train "${common[@]}" --classes 5-9 --max-steps "$steps" \
  --init-from "$work/pre.safetensors" --freeze base --reset-head \
  --metrics "$work/transfer.jsonl" 2>/dev/null | accuracy)
finetune=$("$dtrain" train "${common[@]}" --classes 5-9 --max-steps "$steps" \
  --init-from "$work/pre.safetensors" --reset-head \
  --metrics "$work/finetune.jsonl" 2>/dev/null | accuracy)
scratch=$("$dtrain" train "${common[@]}" --classes 5-9 --max-steps "$steps" \
  --metrics "$work/scratch.jsonl" 2>/dev/null | accuracy)
echo "pretrained on digits 0-4: ${pre_steps} steps, test accuracy (0-4) $(cat "$work/pre.acc")"
echo "digits 5-9 after ${steps} steps (batch 64): transfer with a frozen conv base ${transfer}, transfer fine-tuning all layers ${finetune}, from scratch ${scratch}"
for kind in frozen:$transfer fine-tuned:$finetune; do
  awk -v k="${kind%%:*}" -v t="${kind#*:}" -v s="$scratch" 'BEGIN { d = (t - s) * 100;
    if (t > s) printf "%s transfer beats scratch by %.2f points\n", k, d;
    else printf "%s transfer does NOT beat scratch (%.2f points)\n", k, d; }'
done
