#!/usr/bin/env python3
"""PyTorch CPU peer of the char-lstm row of train_throughput (dtrain's own peer script;
the shared peers' pytorch_train.py has no language model).

The model `dtrain train --model char-lstm` trains, same shape: Embedding(V, H) ->
LSTM or GRU (num_layers, H, batch_first) -> Linear(H, V) on every position, mean
cross-entropy over the B*T targets, Adam (lr 3e-3). Random tokens. Protocol of
../shared/bench/peers/README.md: 5 warm-up steps, median of `reps` repetitions of
`steps` steps. Prints one JSON line with tokens/s (B*T per step).
"""
import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn as nn


class CharRnn(nn.Module):
    def __init__(self, cell, vocab, hidden, layers):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](hidden, hidden, num_layers=layers,
                                                           batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x))
        return self.head(h)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cell", default="lstm")
    p.add_argument("--vocab", type=int, default=114)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = CharRnn(a.cell, a.vocab, a.hidden, a.layers)
    x = torch.randint(0, a.vocab, (a.batch, a.seq_len))
    y = torch.randint(0, a.vocab, (a.batch, a.seq_len))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        loss = loss_fn(model(x).reshape(-1, a.vocab), y.reshape(-1))
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    times = []
    for _ in range(a.reps):
        t = time.perf_counter()
        for _ in range(a.steps):
            step()
        times.append((time.perf_counter() - t) / a.steps)
    med = statistics.median(times)
    r = {"peer": "pytorch", "version": torch.__version__, "model": "char-" + a.cell,
         "threads": torch.get_num_threads(), "ms_per_step": round(med * 1e3, 3),
         "tokens_per_s": round(a.batch * a.seq_len / med, 1)}
    print(f"char-{a.cell}: {r['ms_per_step']:.3f} ms/step {r['tokens_per_s']:.1f} tokens/s",
          file=sys.stderr)
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
