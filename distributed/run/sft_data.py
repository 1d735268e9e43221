"""Supervised fine-tuning data: trajectories to imitate -> a balanced set -> training samples.

A trajectory here is text: a question (id, prompt, reference answer) and one completion. It comes
from a trajectory file, from the task generator's worked solutions (a cold start without a teacher),
or from a teacher's rollouts. `build_sft_set` keeps up to k distinct verified-correct completions per
question and pads by duplication to exactly k rows, so every question weighs the same in the NLL loss;
or, as the paper's k sweep does it, to the same R rows whatever k (`rows`), so that only the diversity
of a question's trajectories changes with k, not the amount of data.
`sft_samples` tokenizes them as the rollout worker would have generated them: the same chat-templated
prompt, then the completion and the eos token, loss on the completion and eos only.

Pure: no Ray, no model. The tokenizer is passed in.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

from innerloop.actors.prompts import chat_prompt_ids
from innerloop.actors.rewards import check_answer
from innerloop.actors.rows import BadRowError, Loaded, field_text, jsonl_rows
from innerloop.distributed.records import Question, TrainingSample, Trajectory

logger = logging.getLogger(__name__)

FIELDS = ("question_id", "prompt", "answer", "completion")  # one JSON object per line, these keys
_NOT_TEXT = (dict, list, bool)  # refused as a field's text; a number is fine (an answer of 42)

Verify = Callable[[str, str], bool]  # (completion, reference answer) -> the final answer is correct


@dataclass(frozen=True)
class SftTrajectory:
    """One completion to imitate, with the question it answers."""

    question_id: str
    prompt: str  # the question text; chat-templated only when tokenized
    answer: str  # the reference answer the verifier checks the completion against
    completion: str  # the assistant's whole turn, without the eos token


# ---------------------------------------------------------------- the trajectory file


def load_trajectory_file(path: str | Path, on_bad_row: Literal["skip", "fail"] = "skip") -> Loaded[SftTrajectory]:
    """Trajectories from a JSON Lines file, one {"question_id", "prompt", "answer", "completion"} per line.

    A line that is not a JSON object or lacks a field is skipped and counted, or with on_bad_row="fail"
    stops the load naming the file and line. Blank lines are ignored; extra keys are allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trajectory file {str(path)!r} does not exist")
    return Loaded.from_rows(path, jsonl_rows(path), _parse_row, on_bad_row, what="lines")


def _parse_row(_index: int, row: Any) -> SftTrajectory:
    if not isinstance(row, dict):
        raise BadRowError(f"the line is a JSON {type(row).__name__}, expected an object with keys {', '.join(FIELDS)}")
    question_id, prompt, answer = (field_text(row, name, _NOT_TEXT).strip() for name in FIELDS[:3])
    # The completion is kept exactly as written: its whitespace is part of what is imitated.
    completion = field_text(row, "completion", _NOT_TEXT)
    if not (question_id and prompt and answer and completion.strip()):
        empty = [name for name in FIELDS if not str(row[name]).strip()]
        raise BadRowError(f"field {empty[0]!r} is empty")
    return SftTrajectory(question_id, prompt, answer, completion)


def write_trajectory_file(path: str | Path, trajectories: Iterable[SftTrajectory]) -> None:
    """The file format `load_trajectory_file` reads (e.g. to keep a teacher's filtered rollouts)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for t in trajectories:
            f.write(json.dumps({name: getattr(t, name) for name in FIELDS}, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- other sources


def solution_trajectories(questions: Iterable[Question]) -> list[SftTrajectory]:
    """One trajectory per question from its worked `solution` (questions without one are skipped).

    The synthetic generator's solutions already end in "The answer is \\boxed{N}"; a solution with no
    \\boxed (a dataset's) gets "The answer is \\boxed{ANSWER}." appended, the format the reward checks.
    """
    out, missing = [], 0
    for q in questions:
        if not q.solution.strip():
            missing += 1
            continue
        out.append(SftTrajectory(q.question_id, q.prompt, q.answer, _with_boxed_answer(q.solution, q.answer)))
    if missing:
        logger.warning("%d of %d questions have no worked solution; they give no SFT trajectory",
                       missing, missing + len(out))
    return out


def _with_boxed_answer(solution: str, answer: str) -> str:
    if "\\boxed" in solution:
        return solution
    return f"{solution.rstrip()}\nThe answer is \\boxed{{{answer}}}."


def teacher_trajectories(rollouts: Iterable[Trajectory], questions: Iterable[Question]) -> list[SftTrajectory]:
    """A teacher's rollout trajectories as text (re-tokenized later with the student's tokenizer)."""
    by_id = {q.question_id: q for q in questions}
    out = []
    for t in rollouts:
        if t.question_id not in by_id:
            raise ValueError(f"teacher trajectory for question {t.question_id!r}, "
                             "which is not among the questions given")
        q = by_id[t.question_id]
        out.append(SftTrajectory(q.question_id, q.prompt, q.answer, t.text))
    return out


def group_by_question(trajectories: Iterable[SftTrajectory]) -> dict[str, list[SftTrajectory]]:
    """Trajectories per question id, in first-seen order; one id must mean one prompt and one answer."""
    groups: dict[str, list[SftTrajectory]] = {}
    for t in trajectories:
        group = groups.setdefault(t.question_id, [])
        if group and (group[0].prompt, group[0].answer) != (t.prompt, t.answer):
            raise ValueError(f"question {t.question_id!r} appears with two different prompts or answers "
                             f"({group[0].prompt!r} -> {group[0].answer!r}, {t.prompt!r} -> {t.answer!r}); "
                             "question ids must be unique per question")
        group.append(t)
    return groups


# ---------------------------------------------------------------- the balanced set


def _is_correct(completion: str, reference: str, answer_pattern: str | None) -> bool:
    return check_answer(completion, reference, answer_pattern).correct


def answer_verifier(answer_pattern: str | None = None) -> Verify:
    """The reward's own check: the completion's final answer (last \\boxed{}, or `answer_pattern`'s
    group) matches the reference. Picklable."""
    return functools.partial(_is_correct, answer_pattern=answer_pattern)


@dataclass(frozen=True)
class SftSet:
    """k items per kept question, and what the filter saw on the way."""

    items: tuple[SftTrajectory, ...]  # question-major, questions in first-seen order, `rows` each
    k: int
    rows: int  # per question: k, or the R the set was padded to
    questions_kept: int
    questions_dropped: int  # no trajectory the verifier accepted
    dropped_ids: tuple[str, ...]
    distinct_per_question: dict[int, int]  # distinct trajectories kept (1..k) -> questions with that many
    wrong: int  # trajectories the verifier rejected
    duplicates: int  # correct trajectories whose text repeated an earlier one of the same question


def build_sft_set(trajectories_by_question: Mapping[str, Sequence[SftTrajectory]], k: int, seed: int,
                  verify: Verify, rows: int | None = None) -> SftSet:
    """Per question: the distinct completions (by exact text) that `verify` accepts; a seeded random k
    of them when there are more, then repeated in turn up to exactly `rows` (default k), so each
    question is trained on equally often (the copies of its distinct ones differ by at most one).
    Questions with none are dropped and counted."""
    if k < 1:
        raise ValueError(f"k (trajectories per question) must be >= 1, got {k}")
    rows = k if rows is None else rows
    if rows < k:
        raise ValueError(f"rows per question ({rows}) must be at least k = {k}, the distinct trajectories kept")
    items: list[SftTrajectory] = []
    dropped, histogram, wrong, duplicates = [], Counter(), 0, 0
    for question_id, trajectories in trajectories_by_question.items():
        correct = [t for t in trajectories if verify(t.completion, t.answer)]
        first_of_each_text: dict[str, SftTrajectory] = {}
        for t in correct:
            first_of_each_text.setdefault(t.completion, t)
        distinct = list(first_of_each_text.values())
        wrong += len(trajectories) - len(correct)
        duplicates += len(correct) - len(distinct)
        if not distinct:
            dropped.append(question_id)
            continue
        chosen = _choose(distinct, k, random.Random(f"{seed}|{question_id}"))
        histogram[len(chosen)] += 1
        items.extend(chosen[i % len(chosen)] for i in range(rows))
    return SftSet(items=tuple(items), k=k, rows=rows, questions_kept=sum(histogram.values()), questions_dropped=len(dropped),
                  dropped_ids=tuple(dropped), distinct_per_question=dict(sorted(histogram.items())), wrong=wrong,
                  duplicates=duplicates)


def _choose(distinct: list[SftTrajectory], k: int, rng: random.Random) -> list[SftTrajectory]:
    # One RNG per question (seeded by a string, independent of PYTHONHASHSEED): a question's pick does
    # not change when other questions are added or removed. Kept in first-seen order.
    if len(distinct) <= k:
        return distinct
    return [distinct[i] for i in sorted(rng.sample(range(len(distinct)), k))]


# ---------------------------------------------------------------- tokens


def sft_samples(items: Iterable[SftTrajectory], tokenizer: Any, system_prompt: str,
                prompt_template: str) -> list[TrainingSample]:
    """One training sample per item: the prompt chat-templated exactly as the rollout worker does it,
    then the completion's tokens and the eos token (so the model learns to stop). Loss on the completion
    and eos only; advantage 1 and sampler log-probs 0 (the NLL loss reads neither)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; SFT needs one to teach the model where to stop")
    # k copies of a question share a prompt, and padded copies share a completion: tokenize each once.
    prompt_ids = functools.cache(lambda text: tuple(chat_prompt_ids(tokenizer, text, system_prompt, prompt_template)))
    completion_ids = functools.cache(lambda text: _completion_ids(tokenizer, text, eos))
    return [TrainingSample.of_completion(prompt_ids(item.prompt), completion_ids(item.completion), advantage=1.0)
            for item in items]


def _completion_ids(tokenizer: Any, text: str, eos: int) -> tuple[int, ...]:
    # Tokenized on its own, as generation produces it after the prompt (not merged across the boundary).
    ids = tuple(tokenizer.encode(text, add_special_tokens=False))
    return ids if ids[-1:] == (eos,) else ids + (eos,)  # a completion written with its eos keeps just one
