"""What the table plots (allreduce_plot.py, scaling_plot.py) share: the command line
`SCRIPT IN.json OUT.png`, reading the JSON and loading matplotlib without a display.

open_plot(command, usage) returns (data, pyplot, out_path), or an exit status (2: usage,
1: the file cannot be read or matplotlib is missing, with one line on stderr naming
`command`).
"""
import json
import sys


def open_plot(command, usage):
    if len(sys.argv) != 3:
        print(f"usage: {usage}", file=sys.stderr)
        return 2
    try:
        with open(sys.argv[1], encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"{command}: cannot read {sys.argv[1]}: {e}", file=sys.stderr)
        return 1
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{command}: matplotlib is missing (apt-get install python3-matplotlib)",
              file=sys.stderr)
        return 1
    return data, plt, sys.argv[2]
