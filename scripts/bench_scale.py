"""How the driver's cost grows with the cluster: Ray's simulated cluster, light engines, real product.

    .venv/bin/python scripts/bench_scale.py --workers 1,4,16,64 --rounds 3 --out runs/bench_scale

Each measurement starts Ray's simulated cluster (`ray.cluster_utils.Cluster`) with as many nodes of
8 declared GPUs as the pool needs, then runs the product's Trainer, Fleet, RolloutPool, placement
group, weight sync and driver loop unchanged; only the engine's and the learner's work is stood in
for (tests/scale_doubles.py: a fixed sleep and fixed-size trajectories, the same for every worker).
Each worker gets one question of G=8 per step, so the work per worker is the same at every size.

Per step it measures, in the driver:
- overhead: the step's wall time minus the time the driver spent blocked on remote calls (every wait
  goes through the watchdog, so wrapping `Watchdog.wait`/`settle` sees them all);
- the weight sync's wall time, and of it the driver's own (outside waits): the fan-out;
- with rollout.sync=transfer, forming the transfer group, re-formed every step (`forget_group`) so
  its cost is seen at every size;
- scheduling latency: from the driver's submit of a worker's share to the worker starting it.

Each (size, sync path, round) runs in a fresh process with a cluster of its own. Results go to
OUT/scale.json; `--plot` (alone or after the runs) draws the figure and prints the table with the
fitted growth exponent (log-log least squares of overhead per step against workers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
GPUS_PER_NODE = 8


def main() -> int:
    args = _parser().parse_args()
    if args.child:
        return _child(args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "scale.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else []
    if not args.plot_only:
        model = out / "model"
        if not (model / "config.json").exists():
            from tests.tiny_model import build_tiny_model

            build_tiny_model(model)
        for round_index in range(args.rounds):
            for sync in args.sync.split(","):
                for workers in [int(w) for w in args.workers.split(",")]:
                    result = _run_child(args, out, model, workers, sync, round_index)
                    if result is None:
                        print(f"workers={workers} sync={sync}: failed (see {out}/child-*.log)", flush=True)
                        continue
                    results.append(result)
                    results_file.write_text(json.dumps(results, indent=1))
                    print(_one_line(result), flush=True)
    summary = summarize(results)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print_table(summary)
    if args.figure:
        plot(summary, Path(args.figure))
        print(f"figure: {args.figure}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,4,16,64", help="rollout worker counts, comma-separated")
    parser.add_argument("--sync", default="object_store,transfer", help="weight-sync paths, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="repeats of every (size, sync) measurement")
    parser.add_argument("--steps", type=int, default=14, help="steps per measurement")
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out of the figures")
    parser.add_argument("--out", default="runs/bench_scale")
    parser.add_argument("--figure", default=None, help="PNG to draw (e.g. docs/figures/driver_scale.png)")
    parser.add_argument("--plot-only", action="store_true", help="summarize OUT/scale.json, run nothing")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one measurement may take")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def _run_child(args, out: Path, model: Path, workers: int, sync: str, round_index: int) -> dict | None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    log = out / f"child-{workers}-{sync}-{round_index}.log"
    command = [sys.executable, __file__, "--child", "--workers", str(workers), "--sync", sync, "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--out", str(out), "--model", str(model),
               "--round", str(round_index)]
    with log.open("w") as handle:
        try:
            done = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return None
    lines = [line for line in log.read_text().splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1].removeprefix("RESULT ")) if done.returncode == 0 and lines else None


# ---------------------------------------------------------------- one measurement (a fresh process)


def _child(args) -> int:
    import psutil
    import ray
    from ray.cluster_utils import Cluster

    from tests import scale_doubles

    from innerloop.distributed.cluster import fleet as fleet_module
    from innerloop.distributed.cluster import rollout_pool, watchdog, weight_sync
    from innerloop.distributed.config_load import load_config
    from innerloop.distributed.run.driver import Trainer
    from innerloop.distributed.state.tracking import RunDir

    workers, sync = int(args.workers), args.sync
    cfg = load_config(None, [
        f"model.name={args.model}", "model.dtype=float32", "rollout.max_model_len=512",
        f"rollout.workers={workers}", f"rollout.questions_per_step={workers}", "rollout.group_size=8", "learner.micro_batch_size=8",
        "rollout.gpus_per_worker=1", "learner.gpus_per_rank=1", "rollout.kv_cache_gib=null",
        f"rollout.sync={sync}", "reward.kind=custom", "reward.custom=tests.doubles:length_reward",
        "tasks.train_count=1000", "tasks.eval_count=8", f"train.steps={args.steps}", "train.checkpoint_every=0",
        "train.max_minutes=0", "train.export_final_model=false", "eval.before_and_after=false",
        "watchdog.first_s=600", "watchdog.floor_s=120"])
    nodes = math.ceil((workers + 1) / GPUS_PER_NODE)  # the learner rank takes a GPU too
    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for _ in range(nodes):
        cluster.add_node(num_cpus=GPUS_PER_NODE + 1, num_gpus=GPUS_PER_NODE)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    cluster_seconds = time.perf_counter() - started

    # Only the engine's and the learner's work is stood in for; every product class runs as it is.
    rollout_pool.RolloutWorker = scale_doubles.ScaleWorker
    fleet_module.Learner = scale_doubles.ScaleLearner
    probe = _Probe()
    probe.install(watchdog.Watchdog, rollout_pool.RolloutPool, fleet_module.Fleet, weight_sync.StreamedSync, RunDir)

    run_dir = Path(args.out) / "runs" / f"{workers}-{sync}-{args.round}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    fleet = fleet_module.Fleet.start(cfg, str(args.model), address=cluster.address)
    start_seconds = time.perf_counter() - started - cluster_seconds
    if sync == "transfer":  # re-form the transfer group at every sync, so forming it is measured each step
        original = fleet.sync_weights

        def reforming(version, wait=True):
            fleet._streamed.forget_group()
            return original(version, wait)

        fleet.sync_weights = reforming
    try:
        Trainer(cfg, run_dir).train(actors=fleet)
        starts = ray.get([w.call_starts.remote() for w in fleet.rollouts.workers], timeout=120)
    finally:
        fleet.shutdown()
    rss_mib = _cluster_rss_mib(psutil)
    ray.shutdown()
    cluster.shutdown()
    result = probe.result(args.warmup, starts)
    result.update(workers=workers, sync=sync, round=args.round, nodes=nodes, steps=args.steps,
                  cluster_seconds=round(cluster_seconds, 2), start_seconds=round(start_seconds, 2),
                  rss_mib=rss_mib)
    print("RESULT " + json.dumps(result))
    return 0


class _Probe:
    """Wraps product methods (in this process only) to time the driver, blocked or not."""

    def __init__(self):
        self.blocked: list[tuple[float, float]] = []  # (start, end) of every wait on remote calls
        self.step_marks: list[float] = []  # when each step's ledger line was written
        self.syncs: list[tuple[float, float]] = []
        self.forms: list[tuple[float, float]] = []
        self.submits: list[tuple[int, float]] = []  # (worker slot, wall time) of each generate share

    def install(self, Watchdog, RolloutPool, Fleet, StreamedSync, RunDir) -> None:
        probe = self

        def timed(cls, name, into):
            original = getattr(cls, name)

            def wrapper(*a, **k):
                begun = time.perf_counter()
                try:
                    return original(*a, **k)
                finally:
                    into.append((begun, time.perf_counter()))

            setattr(cls, name, wrapper)

        timed(Watchdog, "wait", self.blocked)
        timed(Watchdog, "settle", self.blocked)
        timed(Fleet, "sync_weights", self.syncs)
        timed(StreamedSync, "_form", self.forms)
        share = RolloutPool._share

        def submit_share(pool, call, slot, questions, part):
            probe.submits.append((slot, time.time()))
            return share(pool, call, slot, questions, part)

        RolloutPool._share = submit_share
        record = RunDir.record_questions

        def mark(run, step, ids):
            probe.step_marks.append(time.perf_counter())
            return record(run, step, ids)

        RunDir.record_questions = mark

    def result(self, warmup: int, starts: list[list[tuple[str, float]]]) -> dict:
        marks = self.step_marks
        steps = []
        for begin, end in zip(marks[warmup:], marks[warmup + 1:]):
            blocked = _overlap(self.blocked, begin, end)
            sync = [(a, b) for a, b in self.syncs if begin <= a < end]
            sync_wall = sum(b - a for a, b in sync)
            sync_blocked = sum(_overlap(self.blocked, a, b) for a, b in sync)
            forms = [(a, b) for a, b in self.forms if begin <= a < end]
            steps.append({"wall": end - begin, "blocked": blocked, "overhead": end - begin - blocked,
                          "sync_wall": sync_wall, "sync_driver": sync_wall - sync_blocked,
                          "form_wall": sum(b - a for a, b in forms),
                          "form_driver": sum(b - a - _overlap(self.blocked, a, b) for a, b in forms)})
        latency = _scheduling_latency(self.submits, starts, warmup)
        keys = steps[0].keys() if steps else []
        return {**{f"{k}_median_s": statistics.median(s[k] for s in steps) for k in keys},
                "measured_steps": len(steps), "sched_latency_median_s": latency[0],
                "sched_latency_p90_s": latency[1]}


def _overlap(intervals, begin: float, end: float) -> float:
    return sum(max(0.0, min(b, end) - max(a, begin)) for a, b in intervals)


def _scheduling_latency(submits, starts, warmup: int) -> tuple[float | None, float | None]:
    """The k-th share sent to worker i against the k-th generate worker i started (no worker is
    replaced in this benchmark, so the order matches); the first `warmup` steps' are left out."""
    by_slot: dict[int, list[float]] = {}
    for slot, when in submits:
        by_slot.setdefault(slot, []).append(when)
    gaps = []
    for slot, calls in enumerate(starts):
        begun = [when for method, when in calls if method == "generate"]
        gaps += [b - s for s, b in list(zip(by_slot.get(slot, []), begun))[warmup:]]
    if not gaps:
        return None, None
    gaps.sort()
    return statistics.median(gaps), gaps[int(0.9 * (len(gaps) - 1))]


def _cluster_rss_mib(psutil) -> float:
    """Resident memory of this process and everything under it (the whole simulated cluster)."""
    root = psutil.Process()
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return round(total / 2**20, 1)


# ---------------------------------------------------------------- summary, table, figure


def summarize(results: list[dict]) -> dict:
    """Per sync path and size: the median over rounds of each per-step median, with the rounds' range;
    and the fitted growth exponent of overhead per step against workers."""
    out: dict = {}
    for sync in sorted({r["sync"] for r in results}):
        rows = {}
        for workers in sorted({r["workers"] for r in results if r["sync"] == sync}):
            rounds = [r for r in results if r["sync"] == sync and r["workers"] == workers]
            row = {"rounds": len(rounds), "rss_mib": max(r["rss_mib"] for r in rounds)}
            for key in ("overhead", "wall", "sync_wall", "sync_driver", "form_wall", "form_driver"):
                values = [r[f"{key}_median_s"] for r in rounds]
                row[key] = statistics.median(values)
                row[f"{key}_range"] = [min(values), max(values)]
            row["sched_latency"] = statistics.median(r["sched_latency_median_s"] for r in rounds)
            row["sched_latency_p90"] = statistics.median(r["sched_latency_p90_s"] for r in rounds)
            rows[workers] = row
        out[sync] = {"sizes": rows, "overhead_exponent": fit_exponent(rows, "overhead"),
                     "sync_driver_exponent": fit_exponent(rows, "sync_driver")}
    return out


def fit_exponent(rows: dict, key: str) -> float | None:
    """b in y = a * n^b, by least squares on log y against log n."""
    points = [(math.log(n), math.log(row[key])) for n, row in rows.items() if row[key] > 0]
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return round(sum((x - mx) * (y - my) for x, y in points) / sxx, 3) if sxx else None


def print_table(summary: dict) -> None:
    for sync, data in summary.items():
        print(f"\nrollout.sync={sync}: overhead exponent {data['overhead_exponent']}, "
              f"sync fan-out exponent {data['sync_driver_exponent']}")
        print(f"{'workers':>7} {'rounds':>6} {'step ms':>9} {'overhead ms':>12} {'ovh/worker':>10} {'sync ms':>9} "
              f"{'sync drv ms':>11} {'form ms':>8} {'sched ms':>9} {'p90 ms':>7} {'RSS GiB':>8}")
        for n, row in sorted(data["sizes"].items(), key=lambda item: int(item[0])):
            print(f"{n:>7} {row['rounds']:>6} {1e3 * row['wall']:9.1f} {1e3 * row['overhead']:12.1f} "
                  f"{1e3 * row['overhead'] / int(n):10.2f} {1e3 * row['sync_wall']:9.1f} "
                  f"{1e3 * row['sync_driver']:11.1f} {1e3 * row['form_wall']:8.1f} "
                  f"{1e3 * row['sched_latency']:9.1f} {1e3 * row['sched_latency_p90']:7.1f} "
                  f"{row['rss_mib'] / 1024:8.2f}")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for sync, data in summary.items():
        sizes = sorted(data["sizes"].items(), key=lambda item: int(item[0]))
        n = [int(k) for k, _ in sizes]
        y = [1e3 * row["overhead"] for _, row in sizes]
        low = [1e3 * row["overhead_range"][0] for _, row in sizes]
        high = [1e3 * row["overhead_range"][1] for _, row in sizes]
        ax.errorbar(n, y, yerr=[[a - b for a, b in zip(y, low)], [b - a for a, b in zip(y, high)]], marker="o",
                    capsize=3, label=f"sync={sync} (fit n^{data['overhead_exponent']})")
    if summary:
        first = next(iter(summary.values()))["sizes"]
        n0 = min(int(k) for k in first)
        y0 = 1e3 * first[n0 if n0 in first else str(n0)]["overhead"]
        xs = sorted(int(k) for k in first)
        ax.plot(xs, [y0 * x / n0 for x in xs], "k:", label="linear, for reference")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rollout workers")
    ax.set_ylabel("driver overhead per step (ms)")
    ax.set_title("Driver cost against cluster size (simulated cluster, light engines)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _one_line(r: dict) -> str:
    return (f"workers={r['workers']:>3} sync={r['sync']:12} round={r['round']} step {1e3 * r['wall_median_s']:.1f} ms "
            f"overhead {1e3 * r['overhead_median_s']:.1f} ms sync {1e3 * r['sync_wall_median_s']:.1f} ms "
            f"(driver {1e3 * r['sync_driver_median_s']:.1f}) form {1e3 * r['form_wall_median_s']:.1f} ms "
            f"sched {1e3 * (r['sched_latency_median_s'] or 0):.1f} ms RSS {r['rss_mib'] / 1024:.2f} GiB "
            f"start {r['start_seconds']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
