"""The sampled held-out eval: Pass@k from n >= 8 completions per question at a temperature > 0,
strict and lenient, reported beside the greedy strict and lenient accuracy (`eval.sampled`).

Greedy accuracy says what the model answers; Pass@k what it *can* answer in k tries, and the lenient
Pass@k (the last number, boxed or not) what it can answer whatever the format. A training run's eval
record gains these keys (K each of eval.sampled.pass_k, N = eval.sampled.samples):

    eval_sampled_questions, eval_sampled_samples, eval_avg@N, eval_lenient_avg@N,
    eval_pass@K, eval_lenient_pass@K, eval_mg_pass@K

and RUN_DIR/eval_questions.jsonl a line with event "<eval event>_sampled" holding each question's
correct counts (strict and lenient), which `innerloop sweep` pairs across cells.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from innerloop.distributed.lens.accuracy import EVAL_QUESTIONS_FILE, last_eval_line, lenient_correct
from innerloop.distributed.lens.passk import PassKSummary, pass_at_k, summarize
from innerloop.distributed.records import Trajectory

SAMPLED_SUFFIX = "_sampled"  # eval_questions.jsonl: the sampled eval's event is the greedy one's + this


@dataclass(frozen=True)
class SampledOutcome:
    """Per question (in first-seen order) the samples drawn and how many were right."""

    question_ids: tuple[str, ...]
    samples: tuple[int, ...]  # n per question
    strict: tuple[int, ...]  # c per question, by the verifier
    lenient: tuple[int, ...]  # c per question, by the last number
    ks: tuple[int, ...]

    def summary(self, kind: str = "strict") -> PassKSummary:
        correct = self.strict if kind == "strict" else self.lenient
        return summarize(list(zip(self.samples, correct)), self.ks)

    def record(self) -> dict[str, float | int]:
        """The keys this eval adds to a metrics.jsonl eval record."""
        strict, lenient = self.summary("strict"), self.summary("lenient")
        n = strict.samples
        out: dict[str, float | int] = {"eval_sampled_questions": len(self.question_ids), "eval_sampled_samples": n,
                                       f"eval_avg@{n}": strict.avg_at_n, f"eval_lenient_avg@{n}": lenient.avg_at_n}
        for s, l in zip(strict.by_k, lenient.by_k):
            out.update({f"eval_pass@{s.k}": s.pass_at_k, f"eval_lenient_pass@{s.k}": l.pass_at_k,
                        f"eval_mg_pass@{s.k}": s.mg_pass_at_k})
        return out


def score_sampled(trajectories: Sequence[Trajectory], answers: Mapping[str, str], ks: Sequence[int]) -> SampledOutcome:
    """Count n, strict c and lenient c per question; `answers`: reference answer by question id."""
    if not trajectories:
        raise ValueError("no trajectories to score: the sampled eval produced no completions")
    counts: dict[str, list[int]] = {}
    for t in trajectories:
        n_strict_lenient = counts.setdefault(t.question_id, [0, 0, 0])
        n_strict_lenient[0] += 1
        n_strict_lenient[1] += bool(t.correct)
        n_strict_lenient[2] += lenient_correct(t.text, answers.get(t.question_id, ""), t.correct)
    ids = tuple(counts)
    return SampledOutcome(ids, tuple(counts[q][0] for q in ids), tuple(counts[q][1] for q in ids),
                          tuple(counts[q][2] for q in ids), tuple(ks))


def append_sampled_questions(run_path: Path, step: int, event: str, outcome: SampledOutcome) -> None:
    line = {"step": step, "event": event + SAMPLED_SUFFIX, "question_ids": list(outcome.question_ids),
            "samples": list(outcome.samples), "strict": list(outcome.strict), "lenient": list(outcome.lenient)}
    with open(Path(run_path) / EVAL_QUESTIONS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def read_sampled_questions(run_path: Path, event: str = "eval_after") -> dict[str, tuple[int, int, int]] | None:
    """{question id: (n, strict c, lenient c)} of the last sampled line for `event`; None if none."""
    last = last_eval_line(run_path, event + SAMPLED_SUFFIX)
    if last is None:
        return None
    return {q: (n, s, l) for q, n, s, l in zip(last["question_ids"], last["samples"], last["strict"], last["lenient"])}


def per_question_pass_at_k(counts: Mapping[str, tuple[int, int, int]], k: int, kind: str = "strict") -> dict[str, float]:
    """Pass@k of each question (strict or lenient); questions with fewer than k samples are left out."""
    index = 1 if kind == "strict" else 2
    return {q: pass_at_k(v[0], v[index], k) for q, v in counts.items() if v[0] >= k}


def format_sampled(outcome: SampledOutcome, temperature: float) -> str:
    strict, lenient = outcome.summary("strict"), outcome.summary("lenient")
    lines = [f"sampled: {strict.questions} questions x {strict.samples} samples at T={temperature:g}: "
             f"Avg@{strict.samples} {100 * strict.avg_at_n:.1f}% (lenient {100 * lenient.avg_at_n:.1f}%)"]
    for s, l in zip(strict.by_k, lenient.by_k):
        lines.append(f"  Pass@{s.k} {100 * s.pass_at_k:.1f}% (lenient {100 * l.pass_at_k:.1f}%)"
                     f"  mG-Pass@{s.k} {100 * s.mg_pass_at_k:.1f}%")
    return "\n".join(lines)
