#!/usr/bin/env python3
"""The plot of `dtrain bench allreduce ... --out DIR` (run by launcher/src/scaling_report.cc).

    allreduce_plot.py DIR/allreduce.json DIR/allreduce.png

allreduce.json: {"title": ..., "series": [{"name", "bytes", "busbw_GBps"}, ...]}, one
series per backend and peer. Draws busbw (GB/s) against the message size (log2 axis),
800 x 450 pixels. Exit 1 (one line) when the file cannot be read or matplotlib is
missing.
"""
import json
import sys


def main():
    if len(sys.argv) != 3:
        print("usage: allreduce_plot.py ALLREDUCE.json OUT.png", file=sys.stderr)
        return 2
    try:
        with open(sys.argv[1], encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"dtrain bench allreduce: cannot read {sys.argv[1]}: {e}", file=sys.stderr)
        return 1
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("dtrain bench allreduce: matplotlib is missing (apt-get install python3-matplotlib)",
              file=sys.stderr)
        return 1
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for s in data.get("series", []):
        if s.get("bytes"):
            ax.plot(s["bytes"], s["busbw_GBps"], marker=".", label=s["name"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("busbw (GB/s)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(data.get("title", ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(sys.argv[2])  # figsize x dpi: 800 x 450
    return 0


if __name__ == "__main__":
    sys.exit(main())
