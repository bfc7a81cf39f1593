#!/usr/bin/env python3
"""ctest TensorboardEvents: `dtrain train` writes TensorBoard events equal to its
metrics.jsonl, read back by read_events.py (independent framing, CRC and protobuf).

Checks: the first event is file_version "brain.Event:2"; one scalar event per
metrics line with the same step, and train/loss, train/lr, train/samples_per_s equal
to the line's values as float32; train/grad_norm positive and finite; an event at
the summary's step with test/accuracy and test/loss equal to the summary's; a
corrupted byte is a CRC error; --tensorboard none writes none; a folder that cannot be
created is an error naming it; under dtrain launch
--nproc 2 --tensorboard-all-ranks one file per rank, with train/sync_ms, also in
the default run folder (runs/train-<time>/, one for both ranks).
"""
import argparse
import glob
import json
import math
import os
import shutil
import struct
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import read_events  # noqa: E402

FAILURES = []


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        print(f"FAIL: {what}", file=sys.stderr)


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def run(cmd, cwd=None):
    print("+", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=120, cwd=cwd)
    if r.returncode != 0:
        print(r.stdout)
        sys.exit(f"command failed ({r.returncode})")
    return r.stdout


def train_args(args, extra, max_steps=30):
    return ["train", "--model", "mlp", "--epochs", "1", "--max-steps", str(max_steps), "--log-every",
            "5", "--no-progress", "--data-cache", args.data_cache] + extra


def metrics_lines(path):
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return [l for l in lines if "loss" in l and "test_accuracy" not in l], lines[-1]


def check_run(events, metrics_path):
    logs, summary = metrics_lines(metrics_path)
    check(events[0].get("file_version") == "brain.Event:2", "first event is brain.Event:2")
    train = [e for e in events if "train/loss" in e.get("scalars", {})]
    check([e["step"] for e in train] == [l["step"] for l in logs],
          f"steps {[e['step'] for e in train]} == metrics {[l['step'] for l in logs]}")
    for e, l in zip(train, logs):
        s = e["scalars"]
        for tag, key in (("train/loss", "loss"), ("train/lr", "lr"),
                         ("train/samples_per_s", "samples_per_s")):
            check(s[tag] == f32(l[key]), f"step {l['step']} {tag} {s[tag]} == {l[key]}")
        g = s.get("train/grad_norm", -1)
        check(math.isfinite(g) and g > 0, f"step {l['step']} train/grad_norm {g} > 0")
        check(e["wall_time"] > 1.6e9, f"step {l['step']} wall_time {e['wall_time']}")
    test = [e for e in events if "test/accuracy" in e.get("scalars", {})]
    check(len(test) == 1, f"one evaluation event, got {len(test)}")
    if test:
        s = test[0]["scalars"]
        check(test[0]["step"] == summary["steps"], f"eval step {test[0]['step']}")
        check(s["test/accuracy"] == f32(summary["test_accuracy"]), "test/accuracy equals")
        check(s["test/loss"] == f32(summary["test_loss"]), "test/loss equals")
        print(f"events: {len(train)} logs, test/accuracy {s['test/accuracy']:.4f}, "
              f"test/loss {s['test/loss']:.4f}")


def check_corruption(path, work, pb2):
    bad = os.path.join(work, "corrupt.tfevents")
    with open(path, "rb") as f:
        blob = bytearray(f.read())
    blob[len(blob) // 2] ^= 0x01
    with open(bad, "wb") as f:
        f.write(blob)
    try:
        read_events.read_events(bad, pb2)
        check(False, "a corrupted byte raises a CRC error")
    except read_events.CrcError as err:
        check("CRC mismatch" in str(err), f"CRC error names the mismatch: {err}")
        print(f"corrupted copy: {err}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtrain", required=True)
    ap.add_argument("--protoc", default="protoc")
    ap.add_argument("--data-cache", required=True)
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    pb2 = read_events.load_event_module(args.protoc)

    run_dir = os.path.join(args.work, "run")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    out = run([args.dtrain] + train_args(args, ["--metrics", metrics]))
    files = glob.glob(os.path.join(run_dir, "events.out.tfevents.*.rank0"))
    check(len(files) == 1, f"one rank-0 event file beside metrics.jsonl, got {files}")
    check(f"tensorboard: {files[0] if files else ''}" in out, "the banner names the file")
    if files:
        check_run(read_events.read_events(files[0], pb2), metrics)
        check_corruption(files[0], args.work, pb2)

    off = os.path.join(args.work, "off")
    run([args.dtrain] + train_args(args, ["--metrics", os.path.join(off, "metrics.jsonl"),
                                          "--tensorboard", "none"]))
    check(not glob.glob(os.path.join(off, "*tfevents*")), "--tensorboard none writes none")

    all_dir = os.path.join(args.work, "all")
    run([args.dtrain, "launch", "--nproc", "2", "--", "dtrain"] +
        train_args(args, ["--metrics", os.path.join(all_dir, "metrics.jsonl"),
                          "--tensorboard-all-ranks"]))
    for rank in (0, 1):
        f = glob.glob(os.path.join(all_dir, f"events.out.tfevents.*.rank{rank}"))
        check(len(f) == 1, f"rank {rank} has its event file: {f}")
        if f:
            ev = read_events.read_events(f[0], pb2)
            sync = [e["scalars"].get("train/sync_ms", -1) for e in ev if "scalars" in e
                    and "train/loss" in e["scalars"]]
            check(sync and all(s >= 0 for s in sync), f"rank {rank} train/sync_ms {sync}")
    if rank_files := glob.glob(os.path.join(all_dir, "events.out.tfevents.*.rank0")):
        check_run(read_events.read_events(rank_files[0], pb2),
                  os.path.join(all_dir, "metrics.jsonl"))

    # A folder that cannot be created (under a plain file): one error naming it, exit 1.
    blocker = os.path.join(args.work, "a-file")
    open(blocker, "w").close()
    bad = os.path.join(blocker, "tb")
    print("+ dtrain train ... --tensorboard", bad, flush=True)
    r = subprocess.run([args.dtrain] + train_args(args, [
        "--metrics", os.path.join(args.work, "bad", "metrics.jsonl"), "--tensorboard", bad]),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    check(r.returncode == 1 and f"cannot create the TensorBoard folder {bad}" in r.stdout,
          f"unwritable --tensorboard names the folder: {r.returncode} {r.stdout!r}")

    # A resumed run: a second file in the folder, opening with SessionLog START at the
    # resumed step (TensorBoard then drops the first attempt's events past it).
    res = os.path.join(args.work, "resume")
    common = ["--metrics", os.path.join(res, "metrics.jsonl"), "--ckpt-dir",
              os.path.join(res, "ckpt"), "--ckpt-every", "10"]
    run([args.dtrain] + train_args(args, common, max_steps=20))
    run([args.dtrain] + train_args(args, common + ["--resume", "auto"]))
    files = sorted(glob.glob(os.path.join(res, "*tfevents*.rank0")), key=os.path.getmtime)
    check(len(files) == 2, f"resume: two event files, got {files}")
    if len(files) == 2:
        ev = read_events.read_events(files[1], pb2)
        check(ev[1].get("session_log") == "START" and ev[1]["step"] == 20,
              f"resume: SessionLog START at step 20 after the file version: {ev[:2]}")
        steps = [e["step"] for e in ev if "train/loss" in e.get("scalars", {})]
        check(steps == [25, 30], f"resume: the second file logs steps 25, 30: {steps}")

    # Without --metrics: the default run folder (runs/train-<time>/), the same on every rank.
    default = os.path.join(args.work, "default")
    os.makedirs(default)
    run([args.dtrain, "launch", "--nproc", "2", "--", "dtrain"] +
        train_args(args, ["--tensorboard-all-ranks"]), cwd=default)
    folders = glob.glob(os.path.join(default, "runs", "train-*"))
    check(len(folders) == 1, f"one default run folder, got {folders}")
    for rank in (0, 1):
        f = glob.glob(os.path.join(default, "runs", "train-*", f"*tfevents*.rank{rank}"))
        check(len(f) == 1, f"default folder: rank {rank}'s event file beside metrics: {f}")

    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed", file=sys.stderr)
        return 1
    print("TensorboardEvents: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
