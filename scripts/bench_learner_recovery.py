"""What a dead learner rank costs, from the last checkpoint or from the in-memory snapshot, on the demo's model.

    .venv/bin/python scripts/bench_learner.py prepare                      # once: one demo batch (vLLM)
    .venv/bin/python scripts/bench_learner_recovery.py --rounds 3 --set model.dtype=float32

Real Ray actors, real DeepSpeed (gloo), the demo's learner settings, no rollout engine: one update on
the demo's batch (so AdamW's moments exist), then `--rounds` rounds of: a full checkpoint
(`checkpoints.save`: DeepSpeed state, model folder, checksums, fsync); a snapshot
(`Fleet.snapshot_learners`, what recovery.learner_snapshot adds to every step); a restart of the
ranks; the checkpoint loaded (verified first, as recovery does); another restart; the snapshot
loaded. Each part's median and 95% interval over the rounds, and the snapshot's bytes, go to
runs/bench/learner_recovery.json. The weight push to the engines that follows either restore is
the sync every step makes (the README's demo figures). `--resize` also times the ranks restarted as
2 and back as 1, each loading the other count's checkpoint resharded (`innerloop scale --learner-ranks`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_learner import BATCH, OUT, T_95, _samples  # noqa: E402  (the demo batch `prepare` saved)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resize", action="store_true", help="also time 1 -> 2 -> 1 ranks (restart, resharded load)")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="a config override, e.g. model.dtype=float32 on CPUs without bf16")
    args = parser.parse_args()
    if not BATCH.is_file():
        print(f"no demo batch at {BATCH}: run scripts/bench_learner.py prepare first", file=sys.stderr)
        return 2
    parts = measure(args.rounds, args.overrides, args.resize)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "learner_recovery.json").write_text(json.dumps(parts, indent=2))
    print(json.dumps(parts, indent=2))
    return 0


def measure(rounds: int, overrides: list[str], resize: bool = False) -> dict:
    from innerloop.distributed.cluster.fleet import Fleet
    from innerloop.distributed.config_load import load_config
    from innerloop.distributed.run.samples import loss_normalizers
    from innerloop.distributed.state import checkpoints
    from innerloop.distributed.state.model_prep import resolve_model

    cfg = load_config(None, overrides)
    samples = _samples()
    fleet = Fleet.start(cfg, resolve_model(cfg.model.name), rollout_workers=0)
    times: dict[str, list[float]] = {}
    size = 0

    def timed(name, action):
        started = time.perf_counter()
        result = action()
        times.setdefault(name, []).append(time.perf_counter() - started)
        return result

    try:
        timed("update", lambda: fleet.update(samples, loss_normalizers(samples, cfg.algorithm)))
        with tempfile.TemporaryDirectory(dir=OUT) as root:
            for step in range(1, rounds + 1):
                state = checkpoints.DriverState(step, step, 0, cfg.fingerprint(), extra={"learner_ranks": fleet.learner_ranks})
                path = timed("checkpoint", lambda: checkpoints.save(Path(root), state, fleet, keep=1))
                payloads, size = timed("snapshot", fleet.snapshot_learners)
                timed("restart", fleet.restart_learners)
                timed("load_checkpoint", lambda: checkpoints.load(path, fleet))
                timed("restart", fleet.restart_learners)
                timed("load_snapshot", lambda: fleet.restore_learners(payloads))
                del payloads
            if resize:  # what `innerloop scale --learner-ranks` adds to the checkpoint: 1 -> 2 -> 1
                for ranks in (2, 1):
                    written = fleet.learner_ranks
                    state = checkpoints.DriverState(0, 0, 0, cfg.fingerprint(), extra={"learner_ranks": written})
                    path = checkpoints.save(Path(root), state, fleet, keep=1)
                    timed(f"restart_{written}_to_{ranks}", lambda: fleet.resize_learners(ranks))
                    timed(f"load_resharded_{written}_to_{ranks}", lambda: checkpoints.load(path, fleet))
    finally:
        fleet.shutdown()
    summary = {name: _summary(values) for name, values in times.items()}
    return {"model": cfg.model.name, "dtype": cfg.model.dtype, "ranks": cfg.learner.ranks, "rounds": rounds,
            "snapshot_mib": round(size / 2**20, 1), "seconds": summary}


def _summary(values: list[float]) -> dict:
    median = statistics.median(values)
    if len(values) < 2:
        return {"median": round(median, 2), "runs": len(values)}
    half = T_95[len(values) - 1] * statistics.stdev(values) / len(values) ** 0.5
    mean = statistics.mean(values)
    return {"median": round(median, 2), "mean": round(mean, 2), "ci95": [round(mean - half, 2), round(mean + half, 2)],
            "runs": len(values)}


if __name__ == "__main__":
    sys.exit(main())
