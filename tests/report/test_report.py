#!/usr/bin/env python3
"""ctest DtrainReport: `dtrain report RUN_DIR` on a short `dtrain train` run.

Checks: loss.png, throughput.png and lr.png are PNG files (signature, an IHDR chunk
of nonzero size whose CRC holds, IEND last); report.md holds the final train loss,
test_accuracy and test_loss exactly as metrics.jsonl has them; a folder without
metrics.jsonl fails with one line and exit 1; a metrics.jsonl cut off mid-line gives
a warning naming the file and the line, exit 0, and a report of the lines before it; with one event file per rank (dtrain launch
--nproc 2, --tensorboard-all-ranks) a valid rank_throughput.png and a row per rank, rendered by `dtrain train --report`
on rank 0 at the end of the run.
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

FAILURES = []


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        print(f"FAIL: {what}", file=sys.stderr)


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=120)


def check_png(path):
    """A PNG whose first chunk is a valid IHDR with nonzero width and height."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as err:
        check(False, f"{path}: {err}")
        return
    check(blob[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: PNG signature")
    length, kind = struct.unpack(">I4s", blob[8:16])
    data = blob[16:16 + length]
    (crc,) = struct.unpack(">I", blob[16 + length:20 + length])
    check(kind == b"IHDR" and length == 13, f"{path}: IHDR first")
    check(zlib.crc32(kind + data) == crc, f"{path}: IHDR CRC")
    w, h = struct.unpack(">II", data[:8])
    check(w > 0 and h > 0, f"{path}: {w}x{h}")
    check(blob[-8:-4] == b"IEND", f"{path}: IEND last")
    print(f"{os.path.basename(path)}: {w}x{h}, {len(blob)} bytes")


def lines_of(path):
    out = []
    with open(path) as f:
        for line in f:
            out.append(json.loads(line))
    return out


def check_full_report(args, run_dir):
    r = run([args.dtrain, "report", run_dir])
    check(r.returncode == 0, f"report exit {r.returncode}: {r.stderr}")
    out = os.path.join(run_dir, "report")
    for png in ("loss.png", "throughput.png", "lr.png"):
        check_png(os.path.join(out, png))
    lines = lines_of(os.path.join(run_dir, "metrics.jsonl"))
    logs = [l for l in lines if "test_accuracy" not in l]
    summary = lines[-1]
    with open(os.path.join(out, "report.md")) as f:
        md = f.read()
    check(f"| final train loss (step {logs[-1]['step']}) | {logs[-1]['loss']!r} |" in md,
          f"report.md has the final loss {logs[-1]['loss']!r}")
    check(f"| test_accuracy | {summary['test_accuracy']!r} |" in md,
          f"report.md has test_accuracy {summary['test_accuracy']!r}")
    check(f"| test_loss | {summary['test_loss']!r} |" in md,
          f"report.md has test_loss {summary['test_loss']!r}")
    check("- model: mlp" in md, "report.md has the config")


def check_not_a_run(args):
    empty = os.path.join(args.work, "not-a-run")
    os.makedirs(empty)
    r = run([args.dtrain, "report", empty])
    text = (r.stdout + r.stderr).strip()
    check(r.returncode == 1, f"not a run: exit {r.returncode}")
    check(len(text.splitlines()) == 1 and "not a dtrain run folder" in text,
          f"not a run: one line, got {text!r}")


def check_cut_off(args, run_dir):
    cut = os.path.join(args.work, "cut")
    os.makedirs(cut)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        text = f.read().splitlines(keepends=True)
    kept = text[:3] + [text[3][: len(text[3]) // 2]]  # line 4 cut off mid-line
    with open(os.path.join(cut, "metrics.jsonl"), "w") as f:
        f.write("".join(kept))
    r = run([args.dtrain, "report", cut])
    check(r.returncode == 0, f"cut off: exit {r.returncode}: {r.stderr}")
    path = os.path.join(cut, "metrics.jsonl")
    check(f"{path} line 4" in r.stderr and "warning" in r.stderr,
          f"cut off: warning names the file and line 4: {r.stderr!r}")
    check_png(os.path.join(cut, "report", "loss.png"))
    with open(os.path.join(cut, "report", "report.md")) as f:
        md = f.read()
    third = json.loads(text[2])
    check(f"| final train loss (step {third['step']}) | {third['loss']!r} |" in md,
          "cut off: report.md ends at line 3's loss")
    check("No evaluation line" in md, "cut off: report.md says the run did not finish")


def check_ranks(args):
    run_dir = os.path.join(args.work, "ranks")
    r = run([args.dtrain, "launch", "--nproc", "2", "--", "dtrain", "train", "--model", "mlp",
             "--epochs", "1", "--max-steps", "30", "--log-every", "5", "--no-progress",
             "--data-cache", args.data_cache, "--tensorboard-all-ranks", "--report",
             "--metrics", os.path.join(run_dir, "metrics.jsonl")])
    check(r.returncode == 0, f"2-rank train: {r.stdout}{r.stderr}")
    # --report: rank 0 renders the report itself once training ended (one, not two)
    said = [l for l in r.stdout.splitlines() if "report: " in l and "report.md" in l]
    check(len(said) == 1 and said[0].startswith("[rank 0] "), f"train --report: {said!r}")
    check_png(os.path.join(run_dir, "report", "rank_throughput.png"))
    with open(os.path.join(run_dir, "report", "report.md")) as f:
        md = f.read()
    check("## Ranks" in md and "\n| 0 | " in md and "\n| 1 | " in md, "a row per rank")
    check("Spread of the ranks' mean throughput:" in md, "the spread line")
    check("- workers: 2" in md, "the config has 2 workers")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtrain", required=True)
    ap.add_argument("--data-cache", required=True)
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    run_dir = os.path.join(args.work, "run")
    r = run([args.dtrain, "train", "--model", "mlp", "--epochs", "1", "--max-steps", "30",
             "--log-every", "5", "--no-progress", "--data-cache", args.data_cache,
             "--metrics", os.path.join(run_dir, "metrics.jsonl")])
    if r.returncode != 0:
        sys.exit(f"dtrain train failed: {r.stdout}{r.stderr}")
    check_full_report(args, run_dir)
    check_not_a_run(args)
    check_cut_off(args, run_dir)
    check_ranks(args)
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed", file=sys.stderr)
        return 1
    print("DtrainReport: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
