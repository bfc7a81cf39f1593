#!/usr/bin/env bash
# Validates deploy/k8s: yamllint, the Kubernetes API schemas (npm kubernetes-models),
# the env names and flags dtrain really has, the wiring between the objects, every
# kustomize root rendered with `kubectl kustomize`, and negative checks that must
# fail (validate.cjs --self-test, plus a broken copy of the manifests and a broken
# YAML file run through the whole pipeline). Registered with CTest as k8s_manifests.
#
#   tests/k8s/validate.sh [WORK_DIR]
#
# WORK_DIR (default tests/k8s/.work) holds node_modules, installed with `npm ci`
# from the committed package-lock.json the first time and whenever the lock changes.
# Needs node + npm and yamllint (scripts/bootstrap.sh installs them), and a kubectl
# whose kustomize is v4 or newer (KUBECTL=path, else kubectl on PATH) to render the
# overlays. Exit 0: all passed; 1: a check failed; 77 (CTest: skipped), with the
# reason, only when the npm registry cannot be reached and nothing is cached, or no
# such kubectl exists (Debian 12's own kubectl, 1.20, has kustomize v2, which does
# not read the `patches` field) -- after every check that could run has passed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
work="${1:-$here/.work}"
k8s="$repo/deploy/k8s"
start=$(date +%s)

say() { printf '[k8s] %s\n' "$*"; }
fail() { say "FAIL: $*"; exit 1; }
skip() { say "SKIP: $*"; exit 77; }

for tool in node npm yamllint; do
  command -v "$tool" >/dev/null 2>&1 || fail "$tool not found (scripts/bootstrap.sh installs it)"
done

# ---- npm packages (kubernetes-models, yaml, ajv), pinned by package-lock.json
mkdir -p "$work"
stamp="$work/node_modules/.dtrain-lock.sha256"
want="$(sha256sum "$here/package-lock.json" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  cp "$here/package.json" "$here/package-lock.json" "$work/"
  say "npm ci in $work"
  if ! (cd "$work" && npm ci --no-audit --no-fund --loglevel=error >"$work/npm.log" 2>&1); then
    cat "$work/npm.log"
    if ! npm ping >/dev/null 2>&1; then
      skip "the npm registry cannot be reached and $work/node_modules is not installed"
    fi
    fail "npm ci failed (above)"
  fi
  echo "$want" >"$stamp"
fi
export NODE_PATH="$work/node_modules"

# ---- kubectl with kustomize >= v4
kubectl="${KUBECTL:-$(command -v kubectl || true)}"
why_no_kubectl=""
if [ -z "$kubectl" ]; then
  why_no_kubectl="no kubectl on PATH"
else
  kv="$("$kubectl" version --client -o json 2>/dev/null | sed -n 's/.*"kustomizeVersion": *"v\([0-9]*\)\..*/\1/p')"
  if [ -z "$kv" ] || [ "$kv" -lt 4 ]; then
    why_no_kubectl="$kubectl has no kustomize v4 or newer (kustomizeVersion '${kv:-none}')"
    kubectl=""
  fi
fi

# ---- yamllint, and a broken file it must reject
say "yamllint --strict deploy/k8s"
yamllint --strict -c "$here/yamllint.yaml" "$k8s" || fail "yamllint (above)"
neg="$(mktemp -d)"
trap 'rm -rf "$neg"' EXIT
printf 'kind: ConfigMap\nkind: Secret\nmetadata: {name: x}\n' >"$neg/dup.yaml"
if yamllint --strict -c "$here/yamllint.yaml" "$neg/dup.yaml" >/dev/null 2>&1; then
  fail "yamllint accepted a file with a duplicated key"
fi
say "ok    yamllint rejects a broken file"

# ---- schemas, env names, flags, wiring, rendered overlays, self-test
args=(--k8s "$k8s" --src "$repo")
if [ -n "$kubectl" ]; then args+=(--kubectl "$kubectl" --self-test); fi
node "$here/validate.cjs" "${args[@]}" || fail "validate.cjs (above)"

# ---- the whole pipeline on a broken copy must fail
if [ -n "$kubectl" ]; then
  cp -r "$k8s" "$neg/k8s"
  sed -i 's/^  completions: 2$/  completions: two/' "$neg/k8s/base/workers.yaml"
  grep -q 'completions: two' "$neg/k8s/base/workers.yaml" || fail "could not break the copy"
  if node "$here/validate.cjs" --k8s "$neg/k8s" --src "$repo" --kubectl "$kubectl" >"$neg/out" 2>&1; then
    cat "$neg/out"
    fail "validate.cjs accepted a Job with completions: two"
  fi
  grep -q 'completions must be integer' "$neg/out" || { cat "$neg/out"; fail "the broken copy failed for another reason"; }
  say "ok    a broken copy of deploy/k8s is rejected"
fi

say "done in $(($(date +%s) - start)) s"
if [ -z "$kubectl" ]; then
  skip "$why_no_kubectl: the files passed, but the kustomize roots were not rendered"
fi
