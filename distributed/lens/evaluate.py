"""`innerloop eval`: held-out accuracy, Avg@n, Pass@k and mG-Pass@k of a model folder or checkpoint,
with one in-process rollout worker drawing `eval.samples` completions per held-out question, then
(eval.sampled, unless its samples are 0) n >= 8 completions at T > 0 for the standard Pass@k."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from innerloop.distributed.state import checkpoints
from innerloop.distributed.config import Config
from innerloop.distributed.state.model_prep import resolve_model
from innerloop.distributed.lens.accuracy import lenient_correct
from innerloop.distributed.lens.passk import PassKSummary, summarize
from innerloop.distributed.lens.sampled_eval import SampledOutcome, format_sampled, score_sampled
from innerloop.distributed.run.questions import load_questions
from innerloop.distributed.records import Trajectory


@dataclass(frozen=True)
class EvalReport:
    questions: int
    trajectories: int  # questions x samples
    correct: int  # trajectories whose answer is right
    formatted: float  # share of trajectories with the answer format
    passk: PassKSummary
    lenient_correct: int | None = None  # right by the last number, boxed or not (None: answers not given)
    sampled: SampledOutcome | None = None  # eval.sampled's Pass@k (None: off)
    sampled_temperature: float | None = None

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.trajectories)

    @property
    def lenient_accuracy(self) -> float | None:
        return None if self.lenient_correct is None else self.lenient_correct / max(1, self.trajectories)

    def to_dict(self) -> dict:
        lenient = {} if self.lenient_correct is None else {"lenient_correct": self.lenient_correct,
                                                           "lenient_accuracy": self.lenient_accuracy}
        return {"questions": self.questions, "trajectories": self.trajectories, "correct": self.correct,
                "accuracy": self.accuracy, **lenient, "formatted": self.formatted, **self.passk.to_dict(),
                **({} if self.sampled is None else {"sampled": {"temperature": self.sampled_temperature,
                                                                **self.sampled.record()}})}


def resolve_model_or_checkpoint(model: str) -> str:
    """The folder a lens command loads for MODEL: a checkpoint's model subfolder, else the name resolved."""
    path = Path(model)
    return resolve_model(str(checkpoints.model_folder(path)) if path.exists() else model)


def evaluate_model(cfg: Config, model: str) -> EvalReport:
    """The eval's completions, then eval.sampled's, from one in-process worker (one engine start)."""
    from dataclasses import replace

    from innerloop.actors.rollout import RolloutWorker, worker_args

    model_path = resolve_model_or_checkpoint(model)
    _, held_out = load_questions(cfg.tasks)
    answers = {q.question_id: q.answer for q in held_out}
    sampled_cfg = cfg.eval.sampled
    worker = RolloutWorker(*worker_args(cfg, model_path, cfg.train.seed))
    try:
        report = report_from_trajectories(worker.generate(held_out, cfg.eval.samples, sampling=cfg.eval).trajectories,
                                          cfg.eval.pass_k, answers)
        if not sampled_cfg.samples:
            return report
        chosen = held_out[: sampled_cfg.questions] if sampled_cfg.questions else held_out
        # seed 0, as a training run's sampled eval: the same draws for every model compared
        sampled = worker.generate(chosen, sampled_cfg.samples, sampling=sampled_cfg.sampling(cfg.eval), seed=0)
    finally:
        worker.close()
    return replace(report, sampled=score_sampled(sampled.trajectories, answers, sampled_cfg.pass_k),
                   sampled_temperature=sampled_cfg.temperature)


def report_from_trajectories(trajectories: Sequence[Trajectory], ks: Sequence[int],
                             answers: Mapping[str, str] | None = None) -> EvalReport:
    """Count (n samples, c correct) per question, in first-seen question order, and score them.
    `answers` (reference answer by question id): also count lenient correctness (lens/accuracy.py)."""
    if not trajectories:
        raise ValueError("no trajectories to evaluate: the held-out set produced no completions")
    counts: dict[str, list[int]] = {}
    for trajectory in trajectories:
        n_and_c = counts.setdefault(trajectory.question_id, [0, 0])
        n_and_c[0] += 1
        n_and_c[1] += trajectory.correct
    return EvalReport(questions=len(counts), trajectories=len(trajectories),
                      correct=sum(t.correct for t in trajectories),
                      formatted=sum(t.formatted for t in trajectories) / len(trajectories),
                      passk=summarize([(n, c) for n, c in counts.values()], ks),
                      lenient_correct=None if answers is None else sum(
                          lenient_correct(t.text, answers.get(t.question_id, ""), t.correct) for t in trajectories))


def format_report(report: EvalReport, model: str) -> str:
    """The accuracy line (strict, then lenient where known), then Avg@n and Pass@k / mG-Pass@k per k."""
    summary = report.passk
    lines = [f"held-out accuracy of {model}: {100 * report.accuracy:.1f}% "
             f"({report.correct}/{report.trajectories}; {100 * report.formatted:.1f}% formatted)"
             + ("" if report.lenient_correct is None else  # strict (the verifier) beside lenient (the last number)
                f"; lenient {100 * report.lenient_accuracy:.1f}% ({report.lenient_correct}/{report.trajectories})"),
             f"{summary.questions} questions x {summary.samples} samples: "
             f"Avg@{summary.samples} {100 * summary.avg_at_n:.1f}%"]
    for scores in summary.by_k:
        line = f"  Pass@{scores.k} {100 * scores.pass_at_k:.1f}%"
        # mG-Pass@1 is 0 for every model (its sum over thresholds above k/2 is empty): not shown.
        if scores.k > 1:
            line += f"  mG-Pass@{scores.k} {100 * scores.mg_pass_at_k:.1f}%"
        lines.append(line)
    if report.sampled is not None:
        lines.append(format_sampled(report.sampled, report.sampled_temperature or 0.0))
    return "\n".join(lines)
