"""The PyTorch side of `examples/train_mlp.rs`: the same MLP, data and settings.

Reads the example's Parquet data (pyarrow), derives the same `radius` feature, holds out
every tenth row, and trains 17 -> H -> H -> 4 (ReLU) with Adam and cross-entropy, batch
`--batch-size` rows per rank. With `--workers 1` one process runs with one thread (the
CPU a volley rank holds); with more, torch.distributed's DistributedDataParallel over
gloo runs one single-threaded process per rank, each with its own shard. Rows are
reshuffled each epoch from tensors already in memory, so the rate excludes reading
(volley's includes its pipeline running alongside). Prints the held-out accuracy and
samples/s per epoch, then `median_samples_per_s N`.
"""

import argparse
import os
import time

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def load(path):
    t = pq.read_table(path)
    cols = [t.column(f"f{j}").to_numpy().astype(np.float32) for j in range(16)]
    cols.append(cols[0] * cols[0] + cols[1] * cols[1])
    x = np.stack(cols, axis=1)
    y = t.column("label").to_numpy().astype(np.int64)
    ids = t.column("id").to_numpy()
    test = ids % 10 == 0
    return (x[~test], y[~test]), (x[test], y[test])


def model(hidden):
    torch.manual_seed(42)
    return torch.nn.Sequential(
        torch.nn.Linear(17, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 4),
    )


def train(rank, world, args, port, out):
    torch.set_num_threads(1)
    if world > 1:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    (x, y), (tx, ty) = load(args.data)
    x, y, tx, ty = map(torch.from_numpy, (x, y, tx, ty))
    net = model(args.hidden)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(7)
    per_rank = len(x) // world
    rates = []
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x), generator=g)[rank * per_rank : (rank + 1) * per_rank]
        start = time.perf_counter()
        rows = 0
        for i in range(0, per_rank - args.batch_size + 1, args.batch_size):
            idx = perm[i : i + args.batch_size]
            opt.zero_grad()
            loss = loss_fn(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
            rows += len(idx)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            acc = (net(tx).argmax(1) == ty).float().mean().item()
        rate = torch.tensor([rows / seconds * world])
        if world > 1:
            # The group's rate: every rank's rows over the slowest rank's time.
            t = torch.tensor([seconds])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            rate = torch.tensor([rows * world / t.item()])
        rates.append(rate.item())
        if rank == 0:
            print(f"pytorch {world} ranks epoch {epoch + 1}: loss {loss.item():.4f}  "
                  f"accuracy {acc:.4f}  {rate.item():.0f} samples/s", flush=True)
    if rank == 0:
        out.put(sorted(rates)[len(rates) // 2])
    if world > 1:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.003)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=train, args=(r, args.workers, args, port, out))
             for r in range(args.workers)]
    for pr in procs:
        pr.start()
    median = out.get()
    for pr in procs:
        pr.join()
        if pr.exitcode != 0:
            raise SystemExit(f"rank failed with exit code {pr.exitcode}")
    print(f"pytorch {torch.__version__}, {args.workers} ranks")
    print(f"median_samples_per_s {median:.1f}")


if __name__ == "__main__":
    main()
