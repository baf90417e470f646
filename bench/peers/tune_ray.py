"""The Ray Tune side of `examples/bench_tune.rs`.

  python3 bench/peers/tune_ray.py throughput N      # N trials that report 10 times, no work
  python3 bench/peers/tune_ray.py asha              # ASHA over the benchmark's fixed grid

Both run on `ray.init(num_cpus=2)` (this machine's cores), one CPU per trial, FIFO
scheduling for the throughput run. Prints `seconds=<float>` (the sweep only, after
ray.init) and, for ASHA, `best=<float>` and `iterations=<int>`.
"""

import sys
import tempfile
import time

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

# The grid both engines sweep in the ASHA run: 40 values of x in [-1, 1).
GRID = [-1.0 + 2.0 * i / 40 for i in range(40)]


def noop(config):
    for _ in range(10):
        tune.report({"loss": config["x"]})


def curve(config):
    x = config["x"]
    for t in range(1, 11):
        time.sleep(0.02)
        tune.report({"loss": 1.0 + (x - 0.3) ** 2 + 0.05 / t})


def run_config(path):
    try:
        return tune.RunConfig(storage_path=path, verbose=0)
    except AttributeError:  # older Ray
        from ray.train import RunConfig
        return RunConfig(storage_path=path, verbose=0)


def main():
    mode = sys.argv[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    with tempfile.TemporaryDirectory() as d:
        if mode == "throughput":
            n = int(sys.argv[2])
            tuner = tune.Tuner(
                tune.with_resources(noop, {"cpu": 1}),
                param_space={"x": tune.uniform(0, 1)},
                tune_config=tune.TuneConfig(num_samples=n, metric="loss", mode="min"),
                run_config=run_config(d),
            )
            start = time.perf_counter()
            results = tuner.fit()
            seconds = time.perf_counter() - start
            assert len(results) == n and not results.errors
            print(f"seconds={seconds:.4f}")
        else:
            tuner = tune.Tuner(
                tune.with_resources(curve, {"cpu": 1}),
                param_space={"x": tune.grid_search(GRID)},
                tune_config=tune.TuneConfig(
                    num_samples=1, metric="loss", mode="min",
                    scheduler=ASHAScheduler(max_t=10, grace_period=1, reduction_factor=3),
                ),
                run_config=run_config(d),
            )
            start = time.perf_counter()
            results = tuner.fit()
            seconds = time.perf_counter() - start
            best = results.get_best_result().metrics["loss"]
            iterations = sum(r.metrics["training_iteration"] for r in results)
            print(f"seconds={seconds:.4f}")
            print(f"best={best:.6f}")
            print(f"iterations={iterations}")


if __name__ == "__main__":
    main()
