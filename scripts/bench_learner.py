"""The learner's update on the demo's samples: speed and peak memory of its variants, side by side.

    .venv/bin/python scripts/bench_learner.py prepare            # one demo batch, rolled out by vLLM
    .venv/bin/python scripts/bench_learner.py compare --reps 3   # every variant, alternated

`prepare` rolls out one demo step's batch (8 questions x 8 samples, 135M model) with the real rollout
worker and saves it. `compare` runs each variant in a fresh process (so its peak RSS is its own):
the learner is built in-process (real DeepSpeed, gloo, one rank), makes one warm-up update, then
`--updates` timed ones on that same batch. Variants run in turn, `--reps` rounds, so drift on this
noisy machine hits them alike; medians and a 95% interval over the rounds (t over the rounds' ratios)
are reported. Results go to runs/bench/learner_variants.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("runs/bench")
BATCH = OUT / "learner_batch.json"

# name -> config overrides of the learner (or "bare": the bare PyTorch loop on today's micro-batches)
VARIANTS = {
    "padded_5e8": ["learner.bucket_elements=500000000"],  # before: DeepSpeed's default buckets
    "padded": [],  # buckets sized from the model
    "budget_4k": ["learner.max_tokens_per_micro_batch=4096"],
    "budget_2k": ["learner.max_tokens_per_micro_batch=2048"],
    "checkpointed": ["learner.gradient_checkpointing=true"],
    "checkpointed_2k": ["learner.gradient_checkpointing=true", "learner.max_tokens_per_micro_batch=2048"],
    "packed_4k": ["learner.packing=true", "learner.max_tokens_per_micro_batch=4096"],
    "checkpointed_packed_2k": ["learner.gradient_checkpointing=true", "learner.packing=true",
                               "learner.max_tokens_per_micro_batch=2048"],
    "checkpointed_2k_fused": ["learner.gradient_checkpointing=true", "learner.max_tokens_per_micro_batch=2048",
                              "learner.fused_optimizer=true"],
    "checkpointed_1k_fused": ["learner.gradient_checkpointing=true", "learner.max_tokens_per_micro_batch=1024",
                              "learner.fused_optimizer=true"],
    "padded_fused": ["learner.fused_optimizer=true"],
    "bare": None,
}
# A variant name ending in "+mmap" runs with glibc's mmap threshold fixed at 128 KiB: every larger
# tensor is mapped and unmapped on its own, so freed activations cannot fragment the heap.
MMAP_SUFFIX, MMAP_ENV = "+mmap", {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
T_95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["prepare", "compare", "one"])
    parser.add_argument("--variant", default="padded")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--updates", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="a config override for every variant, e.g. model.dtype=float32 on CPUs without bf16")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.command == "prepare":
        return prepare()
    if args.command == "one":
        print(json.dumps(run_one(args.variant, args.updates, args.overrides)))
        return 0
    return compare(args.variants.split(","), args.reps, args.updates, args.overrides)


def prepare(batch: Path = BATCH) -> int:
    """One demo step's batch, rolled out by the real rollout worker, saved to `batch`."""
    from innerloop.actors.rollout import RolloutWorker, worker_args
    from innerloop.distributed.config_load import load_config
    from innerloop.distributed.run.questions import load_questions
    from innerloop.distributed.run.samples import build_samples, group_advantages, group_by_question
    from innerloop.distributed.state.model_prep import resolve_model

    cfg = load_config()
    model = resolve_model(cfg.model.name)
    questions = load_questions(cfg.tasks)[0][: cfg.rollout.questions_per_step]
    worker = RolloutWorker(*worker_args(cfg, model, cfg.train.seed))
    try:
        rollout = worker.generate(questions, cfg.rollout.group_size, seed=0)
    finally:
        worker.close()
    groups = group_by_question(list(rollout.trajectories))
    samples = build_samples(groups, group_advantages(groups, cfg.algorithm), cfg.algorithm)
    batch.write_text(json.dumps([s.__dict__ for s in samples]))
    print(f"{len(samples)} samples, {sum(len(s.input_ids) for s in samples)} tokens -> {batch}")
    return 0


def _samples():
    from innerloop.distributed.records import TrainingSample

    return [TrainingSample(**{k: tuple(v) if isinstance(v, list) else v for k, v in row.items()})
            for row in json.loads(BATCH.read_text())]


def run_one(variant: str, updates: int, common: list[str]) -> dict:
    """One variant in this process: seconds per update (after a warm-up) and this process's peak RSS."""
    from innerloop.distributed.config_load import load_config
    from innerloop.distributed.run.samples import loss_normalizers
    from innerloop.distributed.state.model_prep import resolve_model

    overrides = VARIANTS[variant.removesuffix(MMAP_SUFFIX)]
    cfg = load_config(None, [*common, *(overrides or [])])
    samples, model = _samples(), resolve_model(cfg.model.name)
    normalizers = loss_normalizers(samples, cfg.algorithm)
    update = _bare_update(model, cfg, samples) if overrides is None else _learner_update(model, cfg, samples,
                                                                                          normalizers)
    update()  # warm-up: first-call allocations and kernel choices
    seconds = [update() for _ in range(updates)]
    return {"variant": variant, "seconds": statistics.median(seconds),
            "tokens": sum(len(s.input_ids) for s in samples),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_update_mib": _rss_mib()}


def _rss_mib() -> float:
    """This process's resident memory now (Linux), in MiB: what stays between updates."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def _learner_update(model: str, cfg, samples, normalizers):
    from innerloop.distributed.cluster.placement import free_port
    from innerloop.learners.learner import Learner

    learner = Learner(model, cfg.model.dtype, cfg.learner, cfg.algorithm, cfg.rollout.temperature, 0, 1,
                      "127.0.0.1", free_port(), cfg.train.seed)
    return lambda: learner.update(samples, normalizers).update_seconds


def _bare_update(model_path: str, cfg, samples):
    """The local ceiling: the same model, padded micro-batches and AdamW, with nothing around them."""
    import torch
    from transformers import AutoModelForCausalLM

    from innerloop.learners.batching import collate, micro_batches, shard_for_rank

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.model.dtype))
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learner.lr, foreach=True)
    pad = model.config.pad_token_id or 0
    count = sum(sum(s.loss_mask) for s in samples)

    def update() -> float:
        started = time.perf_counter()
        for chunk in micro_batches(shard_for_rank(samples, 0, 1), cfg.learner.micro_batch_size):
            batch = collate(chunk, pad)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, batch.input_ids[:, 1:, None])
            (-(logprobs.squeeze(-1) * batch.advantages[:, None] * batch.loss_mask[:, 1:]).sum() / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    return update


def compare(variants: list[str], reps: int, updates: int, common: list[str]) -> int:
    if not BATCH.exists():
        raise SystemExit(f"{BATCH} is missing: run `scripts/bench_learner.py prepare` first")
    rounds = []
    for rep in range(reps):
        row = {}
        for variant in variants:
            command = [sys.executable, __file__, "one", "--variant", variant, "--updates", str(updates),
                       *sum((["--set", o] for o in common), [])]
            env = {**os.environ, **MMAP_ENV} if variant.endswith(MMAP_SUFFIX) else None
            out = subprocess.run(command, capture_output=True, text=True, check=True,
                                 env=env).stdout.strip().splitlines()[-1]
            row[variant] = json.loads(out)
            print(f"round {rep}: {variant}: {row[variant]['seconds']:.2f} s, "
                  f"{row[variant]['peak_rss_mib']:.0f} MiB", flush=True)
        rounds.append(row)
    summary = {v: _summary(rounds, v, variants[0]) for v in variants}
    result = {"command": "scripts/bench_learner.py compare " + " ".join(sys.argv[2:]), "rounds": rounds,
              "summary": summary}
    (OUT / "learner_variants.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


def _summary(rounds: list[dict], variant: str, baseline: str) -> dict:
    tokens = rounds[0][variant]["tokens"]
    speed = [tokens / r[variant]["seconds"] for r in rounds]
    ratio = [r[baseline]["seconds"] / r[variant]["seconds"] for r in rounds]
    return {"tokens_per_s": round(statistics.median(speed), 1),
            "peak_rss_mib": round(statistics.median(r[variant]["peak_rss_mib"] for r in rounds)),
            "rss_after_update_mib": round(statistics.median(r[variant].get("rss_after_update_mib", 0) for r in rounds)),
            f"speed_vs_{baseline}": round(statistics.mean(ratio), 3),
            "speed_ratio_ci95": _interval(ratio)}


def _interval(values: list[float]) -> list[float] | None:
    if len(values) < 2:
        return None
    half = T_95[min(len(values) - 1, 9)] * statistics.stdev(values) / math.sqrt(len(values))
    return [round(statistics.mean(values) - half, 3), round(statistics.mean(values) + half, 3)]


if __name__ == "__main__":
    sys.exit(main())
