#!/usr/bin/env python3
"""bf16 mixed precision on PyTorch CPU: the reference models in f32 and under
torch.autocast("cpu", dtype=torch.bfloat16), timed with pytorch_train.py's protocol
(5 warm-up steps, median of reps x steps). The peer of bench/amp_cpu.cc; one JSON
object per line on stdout ({"model", "amp", "samples_per_s", ...}), a table on stderr.
"""
import contextlib, json, os, statistics, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import torch.nn as nn
from pytorch_train import make, parse_timing_args  # the same models and options


def make_step(name, amp, batch):
    torch.manual_seed(0)
    model, x, y = make(name, batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def scope():
        if amp == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step():
        opt.zero_grad()
        with scope():
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    return step


def bench(name, batch, steps, reps):
    """f32 and bf16 medians; the repetitions alternate (a shared machine's load hits both)."""
    steps_of = {amp: make_step(name, amp, batch) for amp in ("f32", "bf16")}
    for _ in range(5):
        for step in steps_of.values():
            step()
    times = {amp: [] for amp in steps_of}
    for _ in range(reps):
        for amp, step in steps_of.items():
            t = time.perf_counter()
            for _ in range(steps):
                step()
            times[amp].append((time.perf_counter() - t) / steps)
    out = []
    for amp, ts in times.items():
        med = statistics.median(ts)
        out.append({"peer": "pytorch", "version": torch.__version__, "model": name, "amp": amp,
                    "batch": batch, "threads": torch.get_num_threads(),
                    "ms_per_step": round(med * 1e3, 3), "samples_per_s": round(batch / med, 1)})
    return out


def main():
    a = parse_timing_args("seed-cnn,mlp", "comma-separated model names")
    for n in a.model.split(","):
        for r in bench(n, a.batch, a.steps, a.reps):
            amp = r["amp"]
            print(f"{n:10s} {amp:5s} batch {r['batch']:4d} threads {r['threads']}: "
                  f"{r['ms_per_step']:8.3f} ms/step {r['samples_per_s']:10.1f} samples/s",
                  file=sys.stderr)
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
