"""Weight sync, streamed (rollout.sync transfer) against the object store, alternated in one run.

    .venv/bin/python scripts/bench_sync.py                      # tiny, 135M, ~0.5B; 2 workers then 1
    .venv/bin/python scripts/bench_sync.py --models tiny --reps 3 --workers 1
    python scripts/bench_sync.py --gpu --models 0.5B,1.5B --workers 1   # one GPU, colocated (CUDA IPC)

For each model one fleet starts (one learner rank, the most workers asked); for each worker count
(the pool resized down between them) the two paths sync the same weights in turn, `--reps` times
each after one warm-up sync apiece; each timed sync is followed by one whose memory is sampled (the first streamed sync forms the group; its time is reported
on its own). Per sync: seconds, and the peak extra memory over the sync of every fleet process
(proportional set size, so shared pages count once; Ray's object store lives in the raylet's) plus
the blob files in shared memory, against its value when the sync began. Medians of the times, the
largest peak. JSON to runs/bench/sync_paths.json; docs/performance.md holds the figures.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench.py's model builders
import bench  # noqa: E402

PATHS = ("transfer", "object_store")


class PeakMemory:
    """Samples the summed PSS of `pids` (and their children) plus innerloop's shared-memory files."""

    def __init__(self, pids: list[int], interval_s: float = 0.01):
        import psutil

        self._processes = [psutil.Process(p) for p in pids]
        self._processes += [c for p in list(self._processes) for c in p.children(recursive=True)]
        self._interval, self._stop, self.peak = interval_s, threading.Event(), 0

    def now(self) -> int:
        total = sum(os.path.getsize(f) for f in glob.glob("/dev/shm/innerloop-*"))
        for process in self._processes:
            try:
                total += process.memory_full_info().pss
            except Exception:  # a process that just ended
                pass
        return total

    def __enter__(self):
        self.base = self.peak = self.now()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self._interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def fleet_pids(fleet) -> list[int]:
    import psutil
    import ray

    pids = ray.get([l.__ray_call__.remote(lambda learner: os.getpid()) for l in fleet.learners], timeout=60)
    pids += ray.get([w.pid.remote() for w in fleet.rollouts.workers], timeout=60)
    return pids + [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "raylet"]


def one_sync(fleet, path: str, version: int) -> tuple[float, int]:
    """Seconds of one sync, and the peak extra memory of the next one (sampling slows the machine,
    so the timed sync runs unobserved)."""
    fleet.cfg.rollout.sync = path
    seconds = fleet.sync_weights(version)
    with PeakMemory(fleet_pids(fleet)) as memory:
        fleet.sync_weights(version)
    return seconds, memory.extra


def measure(fleet, reps: int, version: int) -> tuple[dict, int]:
    row = {path: {"sync_s": [], "peak_extra_bytes": []} for path in PATHS}
    fleet._streamed.forget_group()  # the pool changed: the first streamed sync forms the group
    for path in PATHS:
        seconds, extra = one_sync(fleet, path, version := version + 1)
        row[path]["first_sync_s"], row[path]["first_peak_extra_bytes"] = round(seconds, 3), extra
    for _ in range(reps):
        for path in PATHS:
            seconds, extra = one_sync(fleet, path, version := version + 1)
            row[path]["sync_s"].append(round(seconds, 4))
            row[path]["peak_extra_bytes"].append(extra)
    for path in PATHS:
        row[path]["sync_s_median"] = round(statistics.median(row[path]["sync_s"]), 4)
        row[path]["peak_extra_mib_max"] = round(max(row[path]["peak_extra_bytes"]) / 2**20, 1)
    row["speedup"] = round(row["object_store"]["sync_s_median"] / row["transfer"]["sync_s_median"], 2)
    return row, version


def bench_model(name: str, path: Path, args) -> list[dict]:
    from innerloop.distributed.cluster.fleet import Fleet
    from innerloop.distributed.config_load import load_config

    dtype = "float32" if name == "tiny" else "bfloat16"
    workers = sorted(args.workers, reverse=True)
    device = bench.GPU_OVERRIDES if args.gpu else ["rollout.kv_cache_gib=0.25"]
    cfg = load_config(None, [f"model.name={path}", f"model.dtype={dtype}", *device,
                             "rollout.max_model_len=512", f"rollout.workers={workers[0]}",
                             f"rollout.sync_bucket_mb={args.bucket_mb}"])
    fleet = Fleet.start(cfg, str(path))
    rows, version = [], 0
    params, size = bench._model_size(path)
    try:
        for count in workers:
            fleet.rollouts.resize(count)
            row, version = measure(fleet, args.reps, version)
            rows.append({"model": name, "parameters": params, "bytes": size, "dtype": dtype, "workers": count,
                         "bucket_mb": args.bucket_mb, **row})
            print(f"{name} ({params / 1e6:.1f}M, {size / 2**20:.0f} MiB), {count} workers: transfer "
                  f"{row['transfer']['sync_s_median']:.3f} s, +{row['transfer']['peak_extra_mib_max']} MiB; "
                  f"object_store {row['object_store']['sync_s_median']:.3f} s, "
                  f"+{row['object_store']['peak_extra_mib_max']} MiB; {row['speedup']}x", flush=True)
    finally:
        fleet.shutdown()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,135M,0.5B")
    parser.add_argument("--workers", default="2,1", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--bucket-mb", type=float, default=64.0)
    parser.add_argument("--gpu", action="store_true", help="one GPU, colocated: transfer is then CUDA IPC")
    parser.add_argument("--out", default="runs/bench")
    args = parser.parse_args()
    import ray

    from innerloop.distributed.state.model_prep import resolve_model

    builders = {"tiny": bench._tiny_model, "135M": lambda: Path(resolve_model("smollm2-135m-instruct")),
                "0.5B": lambda: bench.llama_model("0.5B"), "1.5B": lambda: bench.llama_model("1.5B")}
    rows = [row for name in args.models.split(",") for row in bench_model(name, builders[name](), args)]
    ray.shutdown()
    result = {"bench": "sync_paths", "rows": rows, "command": " ".join(["scripts/bench_sync.py", *sys.argv[1:]]),
              "machine": bench._machine(argparse.Namespace(gpu=args.gpu))}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sync_paths.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
