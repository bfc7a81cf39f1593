#!/usr/bin/env python3
"""The plots and the summary of `dtrain report RUN_DIR` (run by launcher/src/cmd_report.cc).

    report.py RUN_DIR OUT_DIR

Reads RUN_DIR/metrics.jsonl (one line per logged step, a final summary line with
test_accuracy), and when present RUN_DIR/step-*/manifest.json (checkpoints) and
RUN_DIR/job.json (the coordinator's generation and restarts). Writes OUT_DIR/loss.png
(train loss against step), OUT_DIR/throughput.png (samples/s against step),
OUT_DIR/lr.png (learning rate) and OUT_DIR/report.md.

A line that is not JSON (a run cut off mid-line) is skipped with a warning naming the
file and the line; what remains is rendered. Exit 1 (one line) when no line is usable
or matplotlib is missing. Not here: per-rank figures (metrics.jsonl is rank 0's).
"""
import glob
import json
import os
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
            if "test_accuracy" in j or "val_loss" in j:
                summary = j
            elif "step" in j and "loss" in j:
                logs.append(j)
    return logs, summary


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
    for key in ("test_accuracy", "test_loss", "val_loss", "val_ppl", "steps", "train_seconds",
                "samples_per_s"):
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


def write_report(run_dir, out, logs, summary, plots):
    lines = [f"# dtrain run report: {os.path.abspath(run_dir)}", ""]
    lines += summary_lines(logs, summary)
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
    write_report(run_dir, out, logs, summary, plots)
    print(f"report: {os.path.join(out, 'report.md')}" + "".join(
        f", {os.path.join(out, p)}" for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
