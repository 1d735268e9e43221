"""Strict and lenient held-out accuracy, and which held-out questions an eval got right.

- strict: the verifier's `correct` (the answer in the required format, e.g. the last `\\boxed{}`);
- lenient: strict, or else the last number anywhere in the completion equals the reference answer,
  boxed or not. So lenient >= strict, and lenient - strict is the share of answers that were right
  but not in the required format: it separates format from reasoning.

A reference answer that is not a plain number (a dataset's "x^2", "Paris") has no lenient reading:
its lenient result is the strict one.

Each eval of a training run appends one line to RUN_DIR/eval_questions.jsonl: the question ids in
eval order and, per question, 1/0 for strict and for lenient. `innerloop sweep` pairs cells on it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Mapping, Sequence

from innerloop.distributed.records import Trajectory

EVAL_QUESTIONS_FILE = "eval_questions.jsonl"

# A number as people write it: optional sign, thousands commas, decimals, a simple fraction a/b;
# or LaTeX's \frac{a}{b}. The lookbehind keeps "x3" and the "-3" of "5-3" from counting as numbers
# (the "3" of "5-3" still counts). A trailing period ("is 42.") is a full stop, not a decimal point.
_PLAIN = r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?"
_FRAC = r"-?\\[dt]?frac\{\s*-?\d+\s*\}\{\s*\d+\s*\}"
_NUMBER = re.compile(f"{_FRAC}|{_PLAIN}")
_FRAC_PARTS = re.compile(r"(-?)\\[dt]?frac\{\s*(-?\d+)\s*\}\{\s*(\d+)\s*\}")


def number_value(token: str) -> Fraction | None:
    """The exact value of one number as written ("1,000", "-0.5", "3/4", "\\frac{3}{4}"); None if it
    is not one, or divides by zero."""
    token = token.strip().replace("\u2212", "-")
    frac = _FRAC_PARTS.fullmatch(token)
    try:
        if frac:
            sign, numerator, denominator = frac.groups()
            value = Fraction(int(numerator), int(denominator))
            return -value if sign else value
        if re.fullmatch(_PLAIN, token) is None:
            return None
        return Fraction(token.replace(",", ""))
    except ZeroDivisionError:
        return None


def last_number(text: str) -> Fraction | None:
    """The value of the last number written in `text`, or None when it holds none."""
    matches = _NUMBER.findall(text.replace("\u2212", "-"))
    return number_value(matches[-1]) if matches else None


def reference_value(answer: str) -> Fraction | None:
    """A reference answer read as a number ("42", " -7 ", "$1,000$", "3/4", "5."); None: not a number."""
    text = answer.strip().strip("$").strip()
    boxed = re.fullmatch(r"\\boxed\{(.*)\}", text)
    if boxed:
        text = boxed.group(1).strip()
    return number_value(text.removesuffix(".")) if text else None


def lenient_correct(completion: str, reference: str, strict: bool) -> bool:
    """Strict, or the completion's last number equals the numeric reference answer."""
    if strict:
        return True
    want = reference_value(reference)
    return want is not None and last_number(completion) == want


@dataclass(frozen=True)
class EvalOutcome:
    """One eval's results, one entry per trajectory in eval order (one greedy sample per question)."""

    question_ids: tuple[str, ...]
    strict: tuple[bool, ...]
    lenient: tuple[bool, ...]
    formatted: tuple[bool, ...]

    @property
    def strict_accuracy(self) -> float:
        return sum(self.strict) / max(1, len(self.strict))

    @property
    def lenient_accuracy(self) -> float:
        return sum(self.lenient) / max(1, len(self.lenient))

    @property
    def formatted_share(self) -> float:
        return sum(self.formatted) / max(1, len(self.formatted))


def score_eval(trajectories: Sequence[Trajectory], answers: Mapping[str, str]) -> EvalOutcome:
    """Strict and lenient correctness of each trajectory; `answers`: reference answer by question id."""
    lenient = tuple(lenient_correct(t.text, answers.get(t.question_id, ""), t.correct) for t in trajectories)
    return EvalOutcome(tuple(t.question_id for t in trajectories), tuple(bool(t.correct) for t in trajectories),
                       lenient, tuple(bool(t.formatted) for t in trajectories))


def append_eval_questions(run_path: Path, step: int, event: str, outcome: EvalOutcome) -> None:
    """One line in RUN_DIR/eval_questions.jsonl for this eval (`event` as in metrics.jsonl)."""
    line = {"step": step, "event": event, "question_ids": list(outcome.question_ids),
            "strict": [int(x) for x in outcome.strict], "lenient": [int(x) for x in outcome.lenient]}
    with open(Path(run_path) / EVAL_QUESTIONS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def read_eval_questions(run_path: Path, event: str = "eval_after") -> dict[str, tuple[bool, bool]] | None:
    """{question id: (strict, lenient)} from the last `event` line of RUN_DIR/eval_questions.jsonl
    (a resumed run may have written one twice); None when the run wrote none. A question sampled
    more than once counts as right only if every sample was (training's evals sample once)."""
    last = last_eval_line(run_path, event)
    if last is None:
        return None
    found: dict[str, tuple[bool, bool]] = {}
    for qid, strict, lenient in zip(last["question_ids"], last["strict"], last["lenient"]):
        before = found.get(qid, (True, True))
        found[qid] = (before[0] and bool(strict), before[1] and bool(lenient))
    return found


def last_eval_line(run_path: Path, event: str) -> dict | None:
    """The last line of RUN_DIR/eval_questions.jsonl for `event` (a resumed run may have written one
    twice); None when there is none."""
    path = Path(run_path) / EVAL_QUESTIONS_FILE
    if not path.is_file():
        return None
    last = None
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:  # a line cut off by a crash mid-write
            continue
        if isinstance(line, dict) and line.get("event") == event:
            last = line
    return last
