#!/usr/bin/env python3
"""PyTorch peer of bench/int8_inference: f32 vs int8 (eager-mode static quantization:
per-channel weights, min/max-calibrated activations, fused Conv/Linear+ReLU)
inference latency of the reference models (shared/bench/peers/README.md), random
weights, batch B; quantized engine onednn, else fbgemm. Prints one JSON object a line."""
import argparse, json, statistics, time

import torch
import torch.nn as nn
import torch.ao.quantization as tq

# Debian's PyTorch 1.13 has no FBGEMM; its x86 int8 engine is oneDNN.
ENGINE = "onednn" if "onednn" in torch.backends.quantized.supported_engines else "fbgemm"


def seed_cnn():
    return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(576, 64), nn.ReLU(), nn.Linear(64, 10))


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256),
                         nn.ReLU(), nn.Linear(256, 10))


def fuse_pairs(m):
    names = [str(i) for i in range(len(m) - 1)
             if isinstance(m[i], (nn.Conv2d, nn.Linear)) and isinstance(m[i + 1], nn.ReLU)]
    return [[n, str(int(n) + 1)] for n in names]


def median_ms(f, iters):
    f(); f()
    t = []
    for _ in range(iters):
        t0 = time.perf_counter(); f(); t.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    torch.backends.quantized.engine = ENGINE
    for name, make in (("mlp", mlp), ("seed-cnn", seed_cnn)):
        m = make().eval()
        x = torch.randn(a.batch, 1, 28, 28)
        with torch.no_grad():
            f32 = median_ms(lambda: m(x), a.iters)
            q = nn.Sequential(tq.QuantStub(), tq.fuse_modules(make().eval(), fuse_pairs(m)),
                              tq.DeQuantStub()).eval()
            q.qconfig = tq.get_default_qconfig(ENGINE)
            tq.prepare(q, inplace=True)
            for _ in range(4):
                q(torch.randn(a.batch, 1, 28, 28))
            tq.convert(q, inplace=True)
            i8 = median_ms(lambda: q(x), a.iters)
        for kind, ms in (("f32", f32), ("int8", i8)):
            print(json.dumps({"peer": "pytorch", "model": name, "kind": kind, "batch": a.batch,
                              "ms": ms, "threads": a.threads}), flush=True)


if __name__ == "__main__":
    main()
