"""The probe's controls: another question's trajectories, cut curves, pairing within questions, the
20-trajectory floor, and the numbers a run logs."""

from __future__ import annotations

import logging

import pytest

from innerloop.distributed.lens import probe_stats
from innerloop.distributed.lens.probe import probe_metrics, summarize_groups
from innerloop.learners.probe import ProbeItem, ProbeRecord, control_items
from innerloop.learners.probe_summary import attribute, summarize_curve, summarize_cut


def test_controls_put_the_next_questions_trajectories_after_this_questions_prompt():
    items = [ProbeItem("a", (1,), (10,), "5", False), ProbeItem("a", (1,), (11,), "5", True),
             ProbeItem("b", (2,), (20,), "7", False), ProbeItem("b", (2,), (21,), "7", True),
             ProbeItem("c", (3,), (30,), "9", False)]
    controls = control_items(items, per_question=1)
    assert [(c.question_id, c.prompt_ids, c.completion_ids, c.answer, c.trajectory_of) for c in controls] == [
        ("a", (1,), (21,), "5", "b"), ("b", (2,), (30,), "7", "c"), ("c", (3,), (11,), "9", "a")]  # right ones first
    assert {c.group for c in controls} == {"other_question"} and not any(c.correct for c in controls)
    assert len(control_items(items, per_question=2)) == 5  # c donates its only one
    assert control_items(items[:2], 1) == [] and control_items(items, 0) == []  # one question: no other to take
    with pytest.raises(ValueError, match=">= 0"):
        control_items(items, -1)


def _record(question: str, group: str, values: list[float], answer_at: int | None = None) -> ProbeRecord:
    positions = tuple(range(len(values)))
    length = len(values) - 1
    return ProbeRecord(question, group == "correct", length, positions, tuple(values),
                       summarize_curve(positions, values, length), attribute(positions, values, ()), group,
                       answer_at, summarize_cut(positions, values, length, answer_at))


def test_slopes_are_means_over_questions_and_cut_curves_leave_out_the_copying():
    # Correct curves fall only after the answer appears (token 2): cut, they are flat.
    records = [_record("q1", "correct", [3.0, 3.0, 3.0, 0.0], answer_at=2),
               _record("q1", "correct", [3.0, 3.0, 3.0, 1.0], answer_at=2),
               _record("q2", "correct", [2.0, 2.0, 2.0, 2.0], answer_at=None),
               _record("q1", "incorrect", [1.0, 1.0, 1.0, 1.0])]
    uncut = probe_stats.group_slopes(records, "correct", "uncut")
    q1 = (summarize_curve(range(4), [3.0, 3.0, 3.0, 0.0], 3).slope + summarize_curve(range(4), [3, 3, 3, 1], 3).slope) / 2
    assert (uncut.trajectories, uncut.questions) == (3, 2) and uncut.mean == pytest.approx(q1 / 2)
    cut = probe_stats.group_slopes(records, "correct", "cut")
    assert cut.mean == pytest.approx(0.0) and cut.ci95_low == pytest.approx(0.0)
    assert probe_stats.group_slopes(records, "other_question", "cut").trajectories == 0


def test_correct_minus_incorrect_is_paired_within_questions_with_a_warning_under_twenty():
    records = [_record("q1", "correct", [2.0, 1.0]), _record("q1", "incorrect", [1.0, 1.0]),
               _record("q2", "correct", [2.0, 0.5]), _record("q2", "incorrect", [1.0, 1.5]),
               _record("q3", "correct", [1.0, 0.0])]  # q3 has no incorrect one: left out of the pair
    pair = probe_stats.paired(records, "correct", "incorrect", "uncut")
    assert (pair.questions, pair.trajectories_a, pair.trajectories_b) == (2, 2, 2)
    assert pair.difference == pytest.approx(((-1.0 - 0.0) + (-1.5 - 0.5)) / 2)
    assert "fewer than 20 trajectories" in pair.warning and "correct: 2" in pair.warning


def test_enough_trajectories_give_an_interval_and_no_warning(caplog):
    records = []
    for q in range(10):  # 10 questions x 2 correct (falling) and 2 incorrect (flat) trajectories, 2 controls
        for k in range(2):
            records += [_record(f"q{q}", "correct", [3.0, 2.0 - 0.1 * k, 1.0]), _record(f"q{q}", "incorrect", [1.0, 1.0, 1.0 + 0.1 * q]),
                        _record(f"q{q}", "other_question", [2.0, 2.0, 2.0 + 0.05 * k])]
    with caplog.at_level(logging.WARNING):
        found = probe_stats.comparisons(records)
    pairs = {(p["b"], p["curve"]): p for p in found["paired"]}
    versus_incorrect = pairs[("incorrect", "uncut")]
    assert versus_incorrect["warning"] == "" and versus_incorrect["excludes_zero"] and versus_incorrect["ci95_high"] < 0
    assert pairs[("other_question", "uncut")]["questions"] == 10 and not caplog.records
    text = probe_stats.format_comparisons(found)
    assert "correct - incorrect uncut" in text and "the interval excludes 0" in text
    metrics = probe_metrics(records)
    assert metrics["probe_correct_trajectories"] == 20 and metrics["probe_other_question_slope"] is not None
    assert metrics["probe_correct_minus_incorrect_uncut_trajectories"] == 20
    assert metrics["probe_correct_minus_other_question_cut_slope"] == pytest.approx(
        pairs[("other_question", "cut")]["difference"])
    assert [g.group for g in summarize_groups(records)] == ["correct", "incorrect", "other_question"]


def test_a_too_small_comparison_is_logged(caplog):
    with caplog.at_level(logging.WARNING):
        probe_stats.comparisons([_record("q", "correct", [2.0, 1.0]), _record("q", "incorrect", [1.0, 1.0])])
    assert any("too few to conclude from" in r.getMessage() for r in caplog.records)
