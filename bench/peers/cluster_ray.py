"""Ray's side of `examples/bench_cluster.rs`: the same two workloads on a local Ray cluster.

  python3 bench/peers/cluster_ray.py tasks N            # N no-op tasks: submit all, get all
  python3 bench/peers/cluster_ray.py pipeline IN OUT    # Ray Data: read, score, filter, write

Prints one line `seconds=<float>` (the work only, after ray.init) and a check value.
"""
import sys
import time

import numpy as np
import pyarrow as pa
import ray


def noop(i):
    return i


def score(batch: pa.Table) -> pa.Table:
    x = batch.column("x").to_numpy()
    w = (x % 7).astype(np.float64)
    batch = batch.append_column("weight", pa.array(w))
    return batch.append_column("score", pa.array(np.sqrt(x.astype(np.float64)) * w))


def main():
    ray.init(num_cpus=int(__import__("os").cpu_count()), include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)
    what = sys.argv[1]
    if what == "tasks":
        n = int(sys.argv[2])
        f = ray.remote(num_cpus=1)(noop)
        ray.get([f.remote(i) for i in range(8)])  # warm the worker pool
        start = time.perf_counter()
        out = ray.get([f.remote(i) for i in range(n)])
        secs = time.perf_counter() - start
        print(f"seconds={secs:.4f} check={sum(out)}")
    elif what == "pipeline":
        src, dst = sys.argv[2], sys.argv[3]
        start = time.perf_counter()
        ds = ray.data.read_parquet(src)
        ds = ds.map_batches(score, batch_format="pyarrow")
        ds = ds.filter(expr="x >= 0")
        ds.write_parquet(dst)
        secs = time.perf_counter() - start
        print(f"seconds={secs:.4f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
