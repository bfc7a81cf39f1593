#!/usr/bin/env python3
"""Training throughput of the reference models on PyTorch CPU.

The project's copy of ../shared/bench/peers/pytorch_train.py (see its README.md), with
"mobilenet" added: the same layers as dtrain's (engine/include/dtrain/engine/nn/mobilenet.h).
"""
import argparse, json, statistics, sys, time
import torch
import torch.nn as nn


class SeedLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(1000, 128)
        self.lstm = nn.LSTM(128, 128, batch_first=True)
        self.head = nn.Linear(128, 1000)

    def forward(self, x):
        h, _ = self.lstm(self.emb(x))
        return self.head(h[:, -1])


def conv_bn_relu6(cin, cout, k, stride=1, groups=1):
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU6()]


def mobilenet():
    layers = conv_bn_relu6(1, 16, 3)
    for cin, cout, s in [(16, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1)]:
        layers += conv_bn_relu6(cin, cin, 3, s, groups=cin) + conv_bn_relu6(cin, cout, 1)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def make(name, batch):
    if name == "mobilenet":
        return mobilenet(), torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    if name == "seed-cnn":
        m = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(576, 64), nn.ReLU(), nn.Linear(64, 10))
        return m, torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    if name == "mlp":
        m = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256),
                          nn.ReLU(), nn.Linear(256, 10))
        return m, torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    if name == "seed-lstm":
        return SeedLSTM(), torch.randint(0, 1000, (batch, 20)), torch.randint(0, 1000, (batch,))
    raise SystemExit(f"unknown model {name}")


def bench(name, batch, steps, reps):
    torch.manual_seed(0)
    model, x, y = make(name, batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - t) / steps)
    med = statistics.median(times)
    return {"peer": "pytorch", "version": torch.__version__, "model": name, "batch": batch,
            "threads": torch.get_num_threads(), "ms_per_step": round(med * 1e3, 3),
            "samples_per_s": round(batch / med, 1)}


def parse_timing_args(model_default, model_help):
    """The peers' shared command line (--model --threads --batch --steps --reps); sets
    torch's thread count."""
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=model_default, help=model_help)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    return a


def main():
    a = parse_timing_args("all", "seed-cnn | mlp | seed-lstm | mobilenet | all")
    names = ["seed-cnn", "mlp", "seed-lstm", "mobilenet"] if a.model == "all" else [a.model]
    for n in names:
        r = bench(n, a.batch, a.steps, a.reps)
        print(f"{n:10s} batch {r['batch']:4d} threads {r['threads']}: "
              f"{r['ms_per_step']:8.3f} ms/step {r['samples_per_s']:10.1f} samples/s", file=sys.stderr)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
