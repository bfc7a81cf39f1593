#!/usr/bin/env python3
"""Allreduce time/algbw/busbw of PyTorch's Gloo backend on this host (float32, sum).

The project's copy of ../shared/bench/peers/gloo_allreduce.py with dtrain's timing
(bench_detail::time_loop in launcher/src/cmd_bench_collectives.cc, nccl-tests' way):
per size min(5, iters) warm-ups, then `trials` rounds of a barrier and `iters`
all-reduces back to back, iters = 64 MiB / size clamped to [4, 50], 5 trials below
1 MiB and 3 from there; a round's time per operation is the slowest rank's (MAX), the
median round is reported; then one all-reduce of refilled tensors counts #wrong (the
timed loop reduces zeros in place, so repeated sums stay finite). Same output as the
shared peer: a table on stderr, one JSON line per size on stdout.
"""
import argparse, json, os, statistics, sys, time
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def loop_timing(nbytes):
    iters = min(50, max(4, (64 << 20) // nbytes))
    return min(5, iters), iters, 5 if nbytes < (1 << 20) else 3


def time_loop(t, nbytes):
    warmup, iters, trials = loop_timing(nbytes)
    t.zero_()
    for _ in range(warmup):
        dist.all_reduce(t)
    rounds = []
    for _ in range(trials):
        dist.barrier()
        s = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(t)
        dt = torch.tensor([(time.perf_counter() - s) / iters], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        rounds.append(float(dt))
    return statistics.median(rounds)


def worker(rank, n, port, sizes, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=n)
    for nbytes in sizes:
        count = max(1, nbytes // 4)
        t = torch.empty((count,))
        sec = time_loop(t, nbytes)
        t.fill_(float(rank + 1))
        dist.all_reduce(t)
        wrong = torch.tensor([int((t != n * (n + 1) / 2).sum())])
        dist.all_reduce(wrong)
        if rank == 0:
            q.put((nbytes, sec, int(wrong)))
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--port", type=int, default=29531)
    p.add_argument("--sizes", default="8,1024,65536,1048576,16777216,67108864")
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, a.nproc, a.port, sizes, q)) for r in range(a.nproc)]
    for pr in procs:
        pr.start()
    rows = [q.get() for _ in sizes]
    for pr in procs:
        pr.join()
    n = a.nproc
    print(f"{'size(B)':>12} {'time(us)':>12} {'algbw(GB/s)':>12} {'busbw(GB/s)':>12} {'#wrong':>7}", file=sys.stderr)
    for nbytes, t, wrong in rows:
        algbw = nbytes / t / 1e9
        busbw = algbw * 2 * (n - 1) / n
        print(f"{nbytes:12d} {t*1e6:12.1f} {algbw:12.3f} {busbw:12.3f} {wrong:7d}", file=sys.stderr)
        print(json.dumps({"peer": "gloo", "nproc": n, "bytes": nbytes, "time_us": round(t * 1e6, 2),
                          "algbw_GBps": round(algbw, 4), "busbw_GBps": round(busbw, 4), "wrong": wrong}), flush=True)


if __name__ == "__main__":
    main()
