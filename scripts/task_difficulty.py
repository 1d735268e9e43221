"""How hard a synthetic task is for a model: greedy and sampled held-out accuracy, strict and lenient.

    .venv/bin/python scripts/task_difficulty.py --task arithmetic:1 --task word:2 --questions 64 \
        --set model.dtype=float32 --json task-difficulty.json

Per task (KIND:DIFFICULTY) it starts one in-process rollout worker on the model (the base model by
default) and draws, on the first `--questions` held-out questions: one greedy completion (what a
training run's held-out eval reports) and `--samples` completions at `--temperature` (Pass@k). Both
are scored strict (the verifier: the last \\boxed{}) and lenient (the last number, boxed or not), so
the table says how much of the task is format and how much is reasoning, and whether the model is
at the floor (Pass@8 near 0) or the ceiling. docs/evaluation.md chooses the reproductions' task
from these figures.
"""

from __future__ import annotations

import argparse
import json
import time

from innerloop.distributed.config_load import load_config
from innerloop.distributed.lens.accuracy import lenient_correct
from innerloop.distributed.lens.evaluate import resolve_model_or_checkpoint
from innerloop.distributed.lens.passk import summarize


def measure(cfg, model_path: str, questions: int, samples: int, ks: list[int]) -> dict:
    from innerloop.actors.rollout import RolloutWorker, worker_args
    from innerloop.distributed.run.questions import load_questions

    _, held_out = load_questions(cfg.tasks)
    held_out = held_out[:questions]
    answers = {q.question_id: q.answer for q in held_out}
    worker = RolloutWorker(*worker_args(cfg, model_path, cfg.train.seed))
    try:
        started = time.perf_counter()
        greedy = worker.generate(held_out, 1, sampling=cfg.eval).trajectories
        greedy_s = time.perf_counter() - started
        sampling = cfg.eval.model_copy(update={"temperature": cfg.rollout.temperature})
        started = time.perf_counter()
        sampled = worker.generate(held_out, samples, sampling=sampling, seed=cfg.train.seed).trajectories
        sampled_s = time.perf_counter() - started
    finally:
        worker.close()
    result = {"kind": cfg.tasks.kind, "difficulty": cfg.tasks.difficulty, "questions": len(held_out),
              "samples": samples, "temperature": sampling.temperature, "greedy_seconds": round(greedy_s, 1),
              "sampled_seconds": round(sampled_s, 1),
              "completion_tokens_mean": sum(len(t.completion_ids) for t in sampled) / len(sampled)}
    for name, judged in (("strict", lambda t: t.correct),
                         ("lenient", lambda t: lenient_correct(t.text, answers[t.question_id], t.correct))):
        result[f"greedy_{name}"] = sum(map(judged, greedy)) / len(greedy)
        counts: dict[str, list[int]] = {}
        for t in sampled:
            n_c = counts.setdefault(t.question_id, [0, 0])
            n_c[0] += 1
            n_c[1] += bool(judged(t))
        summary = summarize([tuple(v) for v in counts.values()], ks)
        result[f"avg_{name}"] = summary.avg_at_n
        for s in summary.by_k:
            result[f"pass@{s.k}_{name}"] = s.pass_at_k
    result["greedy_formatted"] = sum(t.formatted for t in greedy) / len(greedy)
    result["sampled_formatted"] = sum(t.formatted for t in sampled) / len(sampled)
    return result


def row(r: dict, ks: list[int]) -> str:
    def pct(key: str) -> str:
        return f"{100 * r[key]:.1f}%"
    cells = [f"{r['kind']} {r['difficulty']}", pct("greedy_strict"), pct("greedy_lenient"), pct("greedy_formatted"),
             pct("avg_strict"), pct("avg_lenient")] + [f"{pct(f'pass@{k}_strict')} / {pct(f'pass@{k}_lenient')}"
                                                       for k in ks] + [f"{r['completion_tokens_mean']:.0f}",
                                                                       f"{r['sampled_seconds']:.0f}"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", action="append", required=True, metavar="KIND:DIFFICULTY")
    parser.add_argument("--model", default=None, help="a model folder or alias (default: the config's model.name)")
    parser.add_argument("--questions", type=int, default=64, help="held-out questions per task")
    parser.add_argument("--samples", type=int, default=8, help="n: sampled completions per question")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    ks = [k for k in (1, 2, 4, 8, 16) if k <= args.samples]
    results = []
    for task in args.task:
        kind, _, difficulty = task.partition(":")
        cfg = load_config(None, [*args.set, f"tasks.kind={kind}", f"tasks.difficulty={difficulty or 1}",
                                 f"tasks.eval_count={max(args.questions, 1)}"])
        model_path = resolve_model_or_checkpoint(args.model or cfg.model.name)
        results.append(measure(cfg, model_path, args.questions, args.samples, ks))
        print(json.dumps(results[-1]), flush=True)
    print(f"\nT = {results[0]['temperature']}, {args.questions} held-out questions, n = {args.samples}; "
          "Pass@k as strict / lenient\n")
    print("| task, difficulty | greedy strict | greedy lenient | greedy formatted | Avg strict | Avg lenient | "
          + " | ".join(f"Pass@{k}" for k in ks) + " | tokens | sampled s |")
    print("| --- " * (8 + len(ks)) + "|")
    for r in results:
        print(row(r, ks))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
