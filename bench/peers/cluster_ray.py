"""Ray's side of `examples/bench_cluster.rs`: the same two workloads on a local Ray cluster.

  python3 bench/peers/cluster_ray.py tasks N            # N no-op tasks: submit all, get all
  python3 bench/peers/cluster_ray.py roundtrip N        # N one-task round trips: median
  python3 bench/peers/cluster_ray.py control N RUNS     # N no-op tasks, RUNS times: also
                                  # the CPU seconds of Ray's control plane (its GCS
                                  # server and raylet) over each run
  python3 bench/peers/cluster_ray.py pipeline IN OUT    # Ray Data: read, score, filter, write
  python3 bench/peers/cluster_ray.py actorpool IN OUT ACTORS MS
                                  # the pipeline with a stateful stage on ACTORS actors
                                  # taking MS ms of busy work per batch of 4096 rows

Prints one line `seconds=<float>` (the work only, after ray.init) and a check value.
"""
import sys
import time

import numpy as np
import pyarrow as pa
import ray


def noop(i):
    return i


def control_cpu():
    """CPU seconds so far of this Ray instance's GCS server and raylet (children of
    this driver process): (gcs, raylet)."""
    import os
    tick = os.sysconf("SC_CLK_TCK")
    gcs = raylet = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                comm, rest = f.read().split(" (", 1)[1].rsplit(") ", 1)
        except OSError:
            continue
        fields = rest.split()
        if int(fields[1]) != os.getpid():
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tick
        if comm.startswith("gcs_server"):
            gcs += cpu
        elif comm.startswith("raylet"):
            raylet += cpu
    return gcs, raylet


def score(batch: pa.Table) -> pa.Table:
    x = batch.column("x").to_numpy()
    w = (x % 7).astype(np.float64)
    batch = batch.append_column("weight", pa.array(w))
    return batch.append_column("score", pa.array(np.sqrt(x.astype(np.float64)) * w))


class Model:
    """A stand-in for a model: built once per actor, MS ms of busy work per batch."""

    def __init__(self, ms):
        self.ms = ms

    def __call__(self, batch):
        until = time.perf_counter() + self.ms / 1000.0
        while time.perf_counter() < until:
            pass
        return batch


def main():
    import os
    cpus = int(os.environ.get("RAY_NUM_CPUS", os.cpu_count()))
    ray.init(num_cpus=cpus, include_dashboard=False,
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
    elif what == "control":
        n, runs = int(sys.argv[2]), int(sys.argv[3])
        f = ray.remote(num_cpus=1)(noop)
        ray.get([f.remote(i) for i in range(2000)])  # warm the worker pool
        for _ in range(runs):
            (g0, r0), start = control_cpu(), time.perf_counter()
            out = ray.get([f.remote(i) for i in range(n)])
            secs = time.perf_counter() - start
            g1, r1 = control_cpu()
            print(f"seconds={secs:.4f} gcs_cpu={g1 - g0:.3f} raylet_cpu={r1 - r0:.3f} "
                  f"check={sum(out)}", flush=True)
    elif what == "roundtrip":
        n = int(sys.argv[2])
        f = ray.remote(num_cpus=1)(noop)
        ray.get([f.remote(i) for i in range(8)])
        times = []
        for i in range(n):
            start = time.perf_counter()
            ray.get(f.remote(i))
            times.append(time.perf_counter() - start)
        times.sort()
        print(f"seconds={times[len(times) // 2]:.6f}")
    elif what == "actorpool":
        src, dst, actors, ms = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        start = time.perf_counter()
        ds = ray.data.read_parquet(src)
        ds = ds.map_batches(score, batch_format="pyarrow")
        ds = ds.filter(expr="x >= 0")
        ds = ds.map_batches(Model, fn_constructor_args=(ms,), batch_size=4096,
                            batch_format="pyarrow", concurrency=actors, num_cpus=1)
        ds.write_parquet(dst)
        secs = time.perf_counter() - start
        print(f"seconds={secs:.4f}")
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
