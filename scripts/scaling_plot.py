#!/usr/bin/env python3
"""The plot of `dtrain bench scaling ... --out DIR` (run by launcher/src/scaling_report.cc).

    scaling_plot.py DIR/scaling.json DIR/scaling.png

scaling.json: {"title": ..., "series": [{"name", "measured", "ranks", "step_ms",
"efficiency"}, ...]}. Draws two panels side by side, 1000 x 400 pixels: weak-scaling
efficiency (%) and step time (ms) against the rank (GPU) count on a log2 axis; a
predicted series is a line, a measured one points. Exit 1 (one line) when the file
cannot be read or matplotlib is missing.
"""
import sys
import textwrap

from plot_json import open_plot


def main():
    opened = open_plot("dtrain bench scaling", "scaling_plot.py SCALING.json OUT.png")
    if isinstance(opened, int):
        return opened
    data, plt, out = opened
    fig, (eff_ax, step_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    ticks = set()
    for s in data.get("series", []):
        if not s.get("ranks"):
            continue
        ticks.update(s["ranks"])
        style = dict(marker="o", linestyle="none", markersize=7) if s.get("measured") else \
            dict(marker=".", linestyle="-")
        eff_ax.plot(s["ranks"], [100 * e for e in s["efficiency"]], label=s["name"], **style)
        step_ax.plot(s["ranks"], s["step_ms"], label=s["name"], **style)
    for ax, what in ((eff_ax, "weak-scaling efficiency (%)"), (step_ax, "step time (ms)")):
        ax.set_xscale("log", base=2)
        if ticks:
            ax.set_xticks(sorted(ticks))
            ax.set_xticklabels([str(t) for t in sorted(ticks)], fontsize=7)
        ax.set_xlabel("ranks (GPUs)")
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    eff_ax.set_ylim(bottom=0)
    fig.suptitle(textwrap.fill(data.get("title", ""), 160), fontsize=8)
    fig.tight_layout()
    fig.savefig(out)  # figsize x dpi: 1000 x 400
    return 0


if __name__ == "__main__":
    sys.exit(main())
