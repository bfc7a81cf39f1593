#!/usr/bin/env python3
"""The plot of `dtrain bench allreduce ... --out DIR` (run by launcher/src/scaling_report.cc).

    allreduce_plot.py DIR/allreduce.json DIR/allreduce.png

allreduce.json: {"title": ..., "series": [{"name", "bytes", "busbw_GBps"}, ...]}, one
series per backend and peer. Draws busbw (GB/s) against the message size (log2 axis),
800 x 450 pixels. Exit 1 (one line) when the file cannot be read or matplotlib is
missing.
"""
import sys

from plot_json import open_plot


def main():
    opened = open_plot("dtrain bench allreduce", "allreduce_plot.py ALLREDUCE.json OUT.png")
    if isinstance(opened, int):
        return opened
    data, plt, out = opened
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
    fig.savefig(out)  # figsize x dpi: 800 x 450
    return 0


if __name__ == "__main__":
    sys.exit(main())
