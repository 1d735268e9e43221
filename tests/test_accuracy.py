"""Strict and lenient held-out accuracy (distributed/lens/accuracy.py): the lenient parser, the per-question
eval file, and `innerloop eval`'s report of both."""

from __future__ import annotations

from fractions import Fraction

import pytest

from innerloop.distributed.lens import accuracy
from innerloop.distributed.lens.evaluate import format_report, report_from_trajectories
from innerloop.distributed.records import Trajectory


@pytest.mark.parametrize("text, value", [
    ("The answer is 42.", Fraction(42)),  # a trailing full stop is no decimal point
    ("so 5 - 12 = -7", Fraction(-7)),
    ("x = -7.", Fraction(-7)),
    ("It costs 1,250 dollars", Fraction(1250)),
    ("about 3.75 litres", Fraction("3.75")),
    ("half is 1/2", Fraction(1, 2)),
    ("\\frac{3}{4}", Fraction(3, 4)),
    ("-\\frac{3}{4}", Fraction(-3, 4)),
    ("\\boxed{-12}", Fraction(-12)),
    ("$\\boxed{025}$", Fraction(25)),
    ("first 3, then 4, finally 10", Fraction(10)),
    ("5-3", Fraction(3)),  # the "-3" of a subtraction is not a negative number
    ("x3 and y", None),  # a digit inside a word is no number
    ("no numbers here", None),
    ("1/0", None),
    ("minus sign \u22125", Fraction(-5)),
])
def test_last_number(text, value):
    assert accuracy.last_number(text) == value


@pytest.mark.parametrize("reference, value", [
    ("42", Fraction(42)), (" -7 ", Fraction(-7)), ("1,000", Fraction(1000)), ("0.50", Fraction(1, 2)),
    ("3/4", Fraction(3, 4)), ("$12$", Fraction(12)), ("\\boxed{9}", Fraction(9)), ("8.", Fraction(8)),
    ("x^2", None), ("Paris", None), ("", None),
])
def test_reference_value(reference, value):
    assert accuracy.reference_value(reference) == value


@pytest.mark.parametrize("completion, reference, strict, lenient", [
    ("14 + 18 = 32. The answer is \\boxed{32}.", "32", True, True),
    ("14 + 18 = 32", "32", False, True),  # right, but not boxed: lenient only
    ("The answer is 32.", "32", False, True),
    ("The answer is 31.", "32", False, False),
    ("\\boxed{32} (that is 2 more than 30)", "32", True, True),  # strict always counts as lenient
    ("the result is -4", "-4", False, True),
    ("the result is 4", "-4", False, False),
    ("0.5", "1/2", False, True),
    ("the capital is Paris", "Paris", False, False),  # no numeric reference: lenient is strict
])
def test_lenient_correct(completion, reference, strict, lenient):
    assert accuracy.lenient_correct(completion, reference, strict) is lenient


def _trajectory(qid: str, text: str, correct: bool, formatted: bool = True) -> Trajectory:
    return Trajectory(question_id=qid, prompt_ids=(1,), completion_ids=(2,), logprobs=(-0.1,), finish_reason="stop",
                      text=text, reward=1.0 if correct else -1.0, correct=correct, formatted=formatted,
                      policy_version=0)


def _evaluated() -> tuple[list[Trajectory], dict[str, str]]:
    trajectories = [_trajectory("a", "\\boxed{3}", True), _trajectory("b", "it is 5", False, formatted=False),
                    _trajectory("c", "\\boxed{1}", False), _trajectory("d", "it is 8", False, formatted=False)]
    return trajectories, {"a": "3", "b": "5", "c": "2", "d": "7"}


def test_score_eval_and_the_eval_questions_file(tmp_path):
    trajectories, answers = _evaluated()
    outcome = accuracy.score_eval(trajectories, answers)
    assert outcome.strict == (True, False, False, False) and outcome.lenient == (True, True, False, False)
    assert (outcome.strict_accuracy, outcome.lenient_accuracy, outcome.formatted_share) == (0.25, 0.5, 0.5)
    assert accuracy.read_eval_questions(tmp_path) is None
    accuracy.append_eval_questions(tmp_path, 0, "eval_before", outcome)
    later = accuracy.score_eval([_trajectory("a", "3", False)] + trajectories[1:], answers)
    accuracy.append_eval_questions(tmp_path, 8, "eval_after", later)
    accuracy.append_eval_questions(tmp_path, 8, "eval_after", outcome)  # a resumed run evaluated again: the last counts
    with open(tmp_path / accuracy.EVAL_QUESTIONS_FILE, "a") as f:
        f.write('{"event": "eval_af')  # cut off mid-write
    assert accuracy.read_eval_questions(tmp_path) == {"a": (True, True), "b": (False, True), "c": (False, False),
                                                       "d": (False, False)}
    assert accuracy.read_eval_questions(tmp_path, "eval_before")["a"] == (True, True)


def test_eval_report_shows_strict_and_lenient_side_by_side():
    trajectories, answers = _evaluated()
    report = report_from_trajectories(trajectories, [1], answers)
    assert (report.correct, report.lenient_correct, report.lenient_accuracy) == (1, 2, 0.5)
    assert format_report(report, "m").splitlines()[0] == \
        "held-out accuracy of m: 25.0% (1/4; 50.0% formatted); lenient 50.0% (2/4)"
    assert report.to_dict()["lenient_accuracy"] == 0.5
    without = report_from_trajectories(trajectories, [1])  # no reference answers: strict only, as before
    assert without.lenient_correct is None and "lenient" not in format_report(without, "m")
    assert "lenient_accuracy" not in without.to_dict()


def test_the_run_report_shows_lenient_beside_strict(tmp_path):
    from innerloop.distributed.lens.report import _summary_section

    records = [{"step": 0, "event": "eval_before", "eval_accuracy": 0.1, "eval_lenient_accuracy": 0.3},
               {"step": 1, "reward_mean": 0.0},
               {"step": 1, "event": "eval_after", "eval_accuracy": 0.5, "eval_lenient_accuracy": 0.625}]
    _, html = _summary_section(records, tmp_path)
    assert "<td>lenient held-out accuracy after training</td><td>62.5%</td>" in html
    assert "<td>lenient held-out accuracy before training</td><td>30.0%</td>" in html
    _, older = _summary_section([r for r in records if "event" not in r], tmp_path)
    assert "lenient" not in older  # a run from before lenient accuracy: no such rows
