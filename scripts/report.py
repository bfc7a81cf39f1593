#!/usr/bin/env python3
"""The plots and the summary of `dtrain report RUN_DIR` (run by launcher/src/cmd_report.cc).

    report.py RUN_DIR OUT_DIR

Reads RUN_DIR/metrics.jsonl (one line per logged step, a final summary line with
test_accuracy), and when present RUN_DIR/step-*/manifest.json (checkpoints) and
RUN_DIR/job.json (the coordinator's generation and restarts). Writes OUT_DIR/loss.png
(train loss against step), OUT_DIR/throughput.png (samples/s against step),
OUT_DIR/lr.png (learning rate) and OUT_DIR/report.md. With one TensorBoard event file
per rank beside it (`dtrain train --tensorboard-all-ranks`), also
OUT_DIR/rank_throughput.png: each rank's own samples/s (from its own step times) per
logged step, and a table of the spread between ranks.

A line that is not JSON (a run cut off mid-line) is skipped with a warning naming the
file and the line; what remains is rendered. Exit 1 (one line) when no line is usable
or matplotlib is missing. The event files are decoded here by hand (TFRecord framing,
the few protobuf fields of Event/Summary; no CRC check: the test reader does that).
"""
import glob
import json
import os
import re
import struct
import sys


def warn(msg):
    print(f"dtrain report: warning: {msg}", file=sys.stderr)


def read_metrics(path):
    """(log lines, summary line or None); cut-off or non-JSON lines are skipped with a warning."""
    logs, summary = [], None
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                j = json.loads(line)
            except json.JSONDecodeError:
                cut = "" if line.endswith("\n") else " (cut off: no end of line)"
                warn(f"{path} line {n}: not a JSON line{cut}; skipped")
                continue
            if "step" in j and "loss" in j:
                logs.append(j)
            elif "steps" in j:  # the summary line after the evaluation
                summary = j
    return logs, summary


def _varint(b, i):
    v, shift = 0, 0
    while True:
        c = b[i]
        v |= (c & 0x7F) << shift
        i += 1
        if c < 0x80:
            return v, i
        shift += 7


def _fields(b):
    """(field number, wire type, value) of a protobuf message (types 0, 1, 2, 5)."""
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        field, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(b, i)
        elif wt == 1:
            v, i = b[i:i + 8], i + 8
        elif wt == 2:
            n, i = _varint(b, i)
            v, i = b[i:i + n], i + n
        elif wt == 5:
            v, i = b[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wt}")
        yield field, wt, v


def event_scalars(path):
    """{step: {tag: value}} of an event file (records past a damaged one are dropped)."""
    with open(path, "rb") as f:
        blob = f.read()
    out, pos = {}, 0
    try:
        while pos + 12 <= len(blob):
            (n,) = struct.unpack("<Q", blob[pos:pos + 8])
            data = blob[pos + 12:pos + 12 + n]
            pos += 16 + n
            step, values = 0, {}
            for field, _, v in _fields(data):
                if field == 2:
                    step = v
                elif field == 5:
                    for _, _, value in _fields(v):
                        kv = {f: x for f, _, x in _fields(value)}
                        if 1 in kv and 2 in kv:
                            values[kv[1].decode()] = struct.unpack("<f", kv[2])[0]
            if values:
                out.setdefault(step, {}).update(values)
    except (ValueError, IndexError, struct.error, UnicodeDecodeError):
        warn(f"{path}: damaged record at byte {pos}; later records skipped")
    return out


def rank_event_files(run_dir):
    """{rank: newest event file} of the run folder."""
    files = {}
    for f in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*.rank*")),
                    key=os.path.getmtime):
        m = re.search(r"\.rank(\d+)$", f)
        if m:
            files[int(m.group(1))] = f
    return files


def rank_throughput(run_dir):
    """{rank: [(step, samples/s)]} when there is more than one rank's event file."""
    files = rank_event_files(run_dir)
    if len(files) < 2:
        return {}
    per_rank = {}
    for rank, f in sorted(files.items()):
        scalars = event_scalars(f)
        per_rank[rank] = [(s, v["train/samples_per_s"]) for s, v in sorted(scalars.items())
                          if "train/samples_per_s" in v]
    return per_rank


def plot_ranks(out, per_rank):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for rank, points in per_rank.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], label=f"rank {rank}")
    ax.set_xlabel("step")
    ax.set_ylabel("samples/s (own step times)")
    ax.set_title("throughput per rank")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "rank_throughput.png"))
    plt.close(fig)


def rank_lines(per_rank):
    if not per_rank:
        return []
    lines = ["## Ranks", "", "| rank | mean samples/s | slowest log |", "| --- | --- | --- |"]
    means = {}
    for rank, points in per_rank.items():
        vals = [p[1] for p in points[1:]] or [p[1] for p in points]  # the first log warms up
        means[rank] = sum(vals) / len(vals) if vals else 0.0
        lines.append(f"| {rank} | {means[rank]:.1f} | {min(vals, default=0):.1f} |")
    lo, hi = min(means.values()), max(means.values())
    spread = (hi - lo) / hi * 100 if hi > 0 else 0.0
    return lines + ["", f"Spread of the ranks' mean throughput: {spread:.1f}%.", ""]


def plot(out, name, xs, ys, xlabel, ylabel, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    ax.plot(xs, ys, marker="." if len(xs) < 60 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, name))
    plt.close(fig)


def checkpoints(run_dir):
    rows = []
    for m in sorted(glob.glob(os.path.join(run_dir, "step-*", "manifest.json"))):
        try:
            with open(m) as f:
                j = json.load(f)
            rows.append((os.path.basename(os.path.dirname(m)), j.get("step"), j.get("world_size")))
        except (OSError, json.JSONDecodeError):
            warn(f"{m}: unreadable manifest; skipped")
    return rows


def job_state(run_dir):
    path = os.path.join(run_dir, "job.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        warn(f"{path}: unreadable; skipped")
        return None


def summary_lines(logs, summary):
    lines = ["## Final figures", "", "| figure | value |", "| --- | --- |"]
    if logs:
        last = logs[-1]
        lines.append(f"| logged steps | {len(logs)} (last step {last['step']}) |")
        lines.append(f"| final train loss (step {last['step']}) | {last['loss']!r} |")
        lines.append(f"| final learning rate | {last.get('lr')!r} |")
    if summary is None:
        lines += ["", "No evaluation line: the run did not finish (or was cut off).", ""]
        return lines
    for key in ("test_accuracy", "test_loss", "test_ppl", "val_loss", "val_ppl", "steps",
                "train_seconds", "samples_per_s"):
        if key in summary:
            lines.append(f"| {key} | {summary[key]!r} |")
    return lines + [""]


def config_lines(summary, job):
    lines = ["## Config", ""]
    fields = {k: v for k, v in (summary or {}).items()
              if k in ("workers", "data", "generated_data")}
    if not fields:
        lines.append("Not recorded (metrics.jsonl has no summary line).")
    for k, v in fields.items():
        lines.append(f"- {k}: {v}")
    for k, v in (summary or {}).get("config", {}).items():
        lines.append(f"- {k}: {v}")
    lines += ["", "## Restarts and checkpoints", ""]
    if job:
        lines.append(f"- generation {job.get('generation')}, restarts {job.get('restarts')}, "
                     f"state {job.get('state')} (job.json)")
    else:
        lines.append("- restarts: not recorded in this folder (no job.json)")
    return lines


def write_report(run_dir, out, logs, summary, plots, per_rank):
    lines = [f"# dtrain run report: {os.path.abspath(run_dir)}", ""]
    lines += summary_lines(logs, summary)
    lines += rank_lines(per_rank)
    lines += config_lines(summary, job_state(run_dir))
    ckpts = checkpoints(run_dir)
    lines.append(f"- checkpoints: {len(ckpts)}" if ckpts else "- checkpoints: none in this folder")
    for name, step, world in ckpts:
        lines.append(f"  - {name}: step {step}, world size {world}")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))


def main(argv):
    if len(argv) != 3:
        print("usage: report.py RUN_DIR OUT_DIR", file=sys.stderr)
        return 2
    run_dir, out = argv[1], argv[2]
    metrics = os.path.join(run_dir, "metrics.jsonl")
    logs, summary = read_metrics(metrics)
    if not logs and summary is None:
        print(f"dtrain report: {metrics}: no usable metrics line", file=sys.stderr)
        return 1
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"dtrain report: {sys.executable} has no matplotlib "
              "(apt-get install python3-matplotlib)", file=sys.stderr)
        return 1
    os.makedirs(out, exist_ok=True)
    steps = [l["step"] for l in logs]
    plots = []
    if logs:
        plot(out, "loss.png", steps, [l["loss"] for l in logs], "step", "train loss",
             "train loss (mean over ranks)")
        plot(out, "throughput.png", steps, [l.get("samples_per_s", 0) for l in logs], "step",
             "samples/s", "throughput (since the previous log)")
        plot(out, "lr.png", steps, [l.get("lr", 0) for l in logs], "step", "learning rate",
             "learning rate")
        plots = ["loss.png", "throughput.png", "lr.png"]
    per_rank = rank_throughput(run_dir)
    if per_rank:
        plot_ranks(out, per_rank)
        plots.append("rank_throughput.png")
    write_report(run_dir, out, logs, summary, plots, per_rank)
    print(f"report: {os.path.join(out, 'report.md')}" + "".join(
        f", {os.path.join(out, p)}" for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
