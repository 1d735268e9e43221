"""LoRA (learner.lora) against full fine-tuning on the demo's model and batch: the learner's peak memory,
its update time and what publishing the weights costs it, side by side.

    .venv/bin/python scripts/bench_lora.py prepare             # one demo batch, rolled out by vLLM
    .venv/bin/python scripts/bench_lora.py compare --reps 3    # full and LoRA, alternated

`prepare` rolls out one demo step's batch (8 questions x 8 samples, 135M model) with the real rollout
worker and saves it. `compare` runs each variant in a fresh process (so its peak RSS is its own): the
learner is built in-process (real DeepSpeed, gloo, one rank), makes one warm-up update, then
`--updates` timed ones on that batch (`--samples N`: its first N samples, for a shorter run); then it publishes its weights as a sync does, timed: the walk a
streamed sync sends (each tensor in the engine's dtype; with LoRA the merge happens here) and the
object store's safetensors blob. Variants alternate, `--reps` rounds, and each round's ratios are
reported with their median. Results go to runs/bench/lora.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench_learner  # this folder's: the shared batch preparation (scripts/ is on sys.path when run)

OUT = Path("runs/bench")
BATCH = OUT / "lora_batch.json"
VARIANTS = {"full": [], "lora": ["learner.lora.rank=16", "learner.lora.alpha=32"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["prepare", "compare", "one"])
    parser.add_argument("--variant", default="lora", choices=sorted(VARIANTS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--updates", type=int, default=2)
    parser.add_argument("--samples", type=int, default=0, help="the batch's first N samples only (0: all 64)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides for both variants, e.g. model.dtype=float32 on a CPU without bf16")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.command == "prepare":
        return bench_learner.prepare(BATCH)
    if args.command == "one":
        print(json.dumps(run_one(args.variant, args.updates, args.samples, args.set)))
        return 0
    return compare(args.reps, args.updates, args.samples, args.set)


def run_one(variant: str, updates: int, count: int = 0, overrides: list[str] = ()) -> dict:
    """One variant in this process: seconds per update (median after a warm-up), seconds to publish the
    weights both ways, the trainable parameter count and this process's peak RSS."""
    from collections import deque

    from innerloop.distributed.cluster.placement import free_port
    from innerloop.distributed.config_load import load_config
    from innerloop.distributed.records import TrainingSample
    from innerloop.distributed.run.samples import loss_normalizers
    from innerloop.distributed.state.model_prep import resolve_model
    from innerloop.learners.learner import Learner

    cfg = load_config(None, [*overrides, *VARIANTS[variant]])
    samples = [TrainingSample(**{k: tuple(v) if isinstance(v, list) else v for k, v in row.items()})
               for row in json.loads(BATCH.read_text())][: count or None]
    normalizers = loss_normalizers(samples, cfg.algorithm)
    learner = Learner(resolve_model(cfg.model.name), cfg.model.dtype, cfg.learner, cfg.algorithm,
                      cfg.rollout.temperature, 0, 1, "127.0.0.1", free_port(), cfg.train.seed)
    learner.update(samples, normalizers)  # warm-up: first-call allocations and kernel choices
    seconds = statistics.median(learner.update(samples, normalizers).update_seconds for _ in range(updates))
    started = time.perf_counter()
    deque(((name, tensor.to(learner._dtype)) for name, tensor in learner._named_weights()), maxlen=0)
    stream = time.perf_counter() - started
    started = time.perf_counter()
    blob = learner.weights_blob()
    blob_seconds = time.perf_counter() - started
    module = learner.engine.module
    return {"variant": variant, "update_s": seconds, "stream_walk_s": stream, "blob_s": blob_seconds,
            "blob_mib": len(blob) / 2**20,
            "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "tokens": sum(len(s.input_ids) for s in samples),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def compare(reps: int, updates: int, count: int, overrides: list[str]) -> int:
    if not BATCH.exists():
        raise SystemExit(f"{BATCH} is missing: run `scripts/bench_lora.py prepare` first")
    rounds = []
    for rep in range(reps):
        row = {}
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "one", "--variant", variant, "--updates", str(updates),
                                  "--samples", str(count), *(f"--set={o}" for o in overrides)], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            row[variant] = json.loads(out)
            print(f"round {rep}: {variant}: update {row[variant]['update_s']:.2f} s, "
                  f"peak {row[variant]['peak_rss_mib']:.0f} MiB, stream walk {row[variant]['stream_walk_s']:.3f} s, "
                  f"blob {row[variant]['blob_s']:.3f} s", flush=True)
        rounds.append(row)
    keys = ("update_s", "peak_rss_mib", "stream_walk_s", "blob_s")
    summary = {v: {k: round(statistics.median(r[v][k] for r in rounds), 3) for k in keys} for v in VARIANTS}
    for v in VARIANTS:
        summary[v]["trainable_params"] = rounds[0][v]["trainable_params"]
    summary["lora_over_full"] = {k: round(statistics.median(r["lora"][k] / r["full"][k] for r in rounds), 3)
                                 for k in keys}
    result = {"command": "scripts/bench_lora.py compare " + " ".join(sys.argv[2:]), "rounds": rounds,
              "summary": summary}
    (OUT / "lora.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
