"""The sampled held-out eval (eval.sampled): Pass@k from n >= 8 samples at T > 0, strict and lenient,
in a run's eval record, `innerloop eval`'s report and the sweep table."""

from __future__ import annotations

import json

import pytest

from innerloop.distributed.config_load import load_config
from innerloop.distributed.config_base import ConfigError
from innerloop.distributed.lens import sampled_eval, sweep_table
from innerloop.distributed.lens.evaluate import format_report, report_from_trajectories
from innerloop.distributed.records import Trajectory


def _trajectory(qid: str, correct: bool, text: str = "") -> Trajectory:
    return Trajectory(qid, (1,), (2,), (-0.1,), "stop", text, float(correct), correct, correct, 0)


def test_defaults_are_eight_samples_at_a_temperature_not_drawn_during_training():
    cfg = load_config(None).eval.sampled
    assert (cfg.samples, cfg.temperature, cfg.pass_k, cfg.questions, cfg.in_training) == (8, 0.7, [2, 4, 8], 32, "off")
    sampling = cfg.sampling(load_config(None, ["eval.max_tokens=64"]).eval)
    assert sampling.temperature == 0.7 and sampling.max_tokens == 64


@pytest.mark.parametrize("override, message", [
    ("eval.sampled.samples=4", "at least 8 samples"),
    ("eval.sampled.pass_k=[3]", "even k"),
    ("eval.sampled.pass_k=[16]", "k=16 > eval.sampled.samples = 8"),
    ("eval.sampled.temperature=0", "greater than 0"),
])
def test_a_non_standard_sampled_eval_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_off_needs_no_k_check():
    assert load_config(None, ["eval.sampled.samples=0", "eval.sampled.pass_k=[64]"]).eval.sampled.samples == 0


def test_score_counts_strict_and_lenient_per_question():
    # q1: 2 of 8 boxed right and 2 more right unboxed; q2: none right at all.
    trajectories = ([_trajectory("q1", True, "\\boxed{7}")] * 2 + [_trajectory("q1", False, "so 7")] * 2
                    + [_trajectory("q1", False, "so 6")] * 4 + [_trajectory("q2", False, "9")] * 8)
    outcome = sampled_eval.score_sampled(trajectories, {"q1": "7", "q2": "3"}, [2, 8])
    assert outcome.question_ids == ("q1", "q2") and outcome.samples == (8, 8)
    assert outcome.strict == (2, 0) and outcome.lenient == (4, 0)
    record = outcome.record()
    assert record["eval_avg@8"] == pytest.approx(2 / 16) and record["eval_lenient_avg@8"] == pytest.approx(4 / 16)
    assert record["eval_pass@8"] == pytest.approx(0.5) and record["eval_lenient_pass@8"] == pytest.approx(0.5)
    # Pass@2 of 2 right in 8 is 1 - C(6,2)/C(8,2) = 13/28; of 4 in 8, 1 - C(4,2)/C(8,2) = 22/28
    assert record["eval_pass@2"] == pytest.approx(13 / 28 / 2) and record["eval_lenient_pass@2"] == pytest.approx(22 / 28 / 2)
    assert record["eval_sampled_questions"] == 2 and record["eval_sampled_samples"] == 8
    assert "Pass@8 50.0% (lenient 50.0%)" in sampled_eval.format_sampled(outcome, 0.7)


def test_per_question_counts_round_trip_through_the_run_directory(tmp_path):
    outcome = sampled_eval.SampledOutcome(("a", "b"), (8, 8), (1, 8), (2, 8), (2, 8))
    sampled_eval.append_sampled_questions(tmp_path, 3, "eval_after", outcome)
    (tmp_path / "eval_questions.jsonl").open("a").write('{"event": "eval_after_sampled", "question_ids": [')  # cut off
    counts = sampled_eval.read_sampled_questions(tmp_path)
    assert counts == {"a": (8, 1, 2), "b": (8, 8, 8)}
    assert sampled_eval.read_sampled_questions(tmp_path, "eval_before") is None
    assert sampled_eval.per_question_pass_at_k(counts, 8) == {"a": 1.0, "b": 1.0}
    assert sampled_eval.per_question_pass_at_k(counts, 1, "lenient")["a"] == pytest.approx(2 / 8)


def test_eval_report_shows_the_sampled_block_and_writes_it_to_json():
    from dataclasses import replace

    report = report_from_trajectories([_trajectory("q", True, "\\boxed{1}")], [1], {"q": "1"})
    sampled = sampled_eval.SampledOutcome(("q",), (8,), (3,), (5,), (2, 8))
    report = replace(report, sampled=sampled, sampled_temperature=0.7)
    text = format_report(report, "m")
    assert text.splitlines()[0].startswith("held-out accuracy of m: 100.0%")
    assert "sampled: 1 questions x 8 samples at T=0.7: Avg@8 37.5% (lenient 62.5%)" in text
    assert report.to_dict()["sampled"]["eval_pass@8"] == 1.0


def _run_dir(tmp_path, name: str, per_question_correct: list[int]):
    """A finished run whose final eval sampled 8 per question, `c` right for each question."""
    run_dir = tmp_path / name
    run_dir.mkdir()
    ids = [f"q{i}" for i in range(len(per_question_correct))]
    outcome = sampled_eval.SampledOutcome(tuple(ids), (8,) * len(ids), tuple(per_question_correct),
                                          tuple(per_question_correct), (2, 8))
    record = {"step": 2, "event": "eval_after", "eval_accuracy": 0.5, "eval_lenient_accuracy": 0.5, **outcome.record()}
    (run_dir / "metrics.jsonl").write_text(json.dumps(record) + "\n" + json.dumps({"step": 2, "event": "done"}) + "\n")
    (run_dir / "eval_questions.jsonl").write_text(json.dumps(
        {"step": 2, "event": "eval_after", "question_ids": ids, "strict": [1] * len(ids), "lenient": [1] * len(ids)}) + "\n")
    sampled_eval.append_sampled_questions(run_dir, 2, "eval_after", outcome)
    return sweep_table.RunRow(name.split("-")[0], int(name.split("-")[1]), run_dir, "done")


def test_the_sweep_table_reports_pass_at_k_with_intervals_and_a_paired_comparison(tmp_path):
    # Cell a: every question 1 of 8 right (Pass@8 = 1); cell b: half the questions none right.
    rows = [_run_dir(tmp_path, f"a-{s}", [1] * 6) for s in (0, 1)]
    rows += [_run_dir(tmp_path, f"b-{s}", [1, 1, 1, 0, 0, 0]) for s in (0, 1)]
    summary = sweep_table.write_tables(tmp_path, "s.yaml", {"a": [], "b": []}, rows, [], 3, figure=False)
    a, b = summary["cells"]
    assert a["pass"]["eval_pass@8"]["mean"] == 1.0 and b["pass"]["eval_pass@8"]["mean"] == 0.5
    assert list(a["pass"]) == ["eval_pass@2", "eval_lenient_pass@2", "eval_pass@8", "eval_lenient_pass@8"]
    [pair] = summary["comparisons"]
    assert pair["pass@8"]["questions"] == 6 and pair["pass@8"]["bootstrap"]["difference"] == pytest.approx(0.5)
    table = (tmp_path / "sweep.md").read_text()
    assert "| strict accuracy | lenient accuracy | Pass@8 | lenient Pass@8 |" in table
    assert "| a | - | 2/2 | 50.0% ± 0.0 | 50.0% ± 0.0 | 100.0% ± 0.0 | 100.0% ± 0.0 |" in table
    assert "| a | b | 0,1 | 6 | pass@8 | +50.0 [" in table


def test_probe_metrics_in_the_sweep_table_are_means_over_the_runs_probe_events(tmp_path):
    run_dir = tmp_path / "a"
    run_dir.mkdir()
    lines = [{"step": 1, "reward_mean": 0.5}, {"step": 0, "event": "probe", "probe_correct_slope": -1.0},
             {"step": 2, "event": "probe", "probe_correct_slope": -2.0}, {"step": 2, "reward_mean": 0.7}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = sweep_table.run_result(run_dir, ["probe_correct_slope", "reward_mean"], last_steps=1)
    assert result["metrics"] == {"probe_correct_slope": -1.5, "reward_mean": 0.7}


def test_the_report_shows_pass_at_k_beside_the_accuracies():
    from innerloop.distributed.lens.report import _pass_rows

    outcome = sampled_eval.SampledOutcome(("a",), (8,), (2,), (4,), (2, 8))
    records = [{"event": "eval_after", "eval_accuracy": 0.5, **outcome.record()}, {"step": 1, "reward_mean": 0.1}]
    [(title, text)] = _pass_rows(records)
    assert title == "Pass@k after (1 questions x 8 samples; strict / lenient)"
    assert text.startswith("@2 ") and "@8 100.0% / 100.0%" in text
    assert _pass_rows([{"event": "eval_after", "eval_accuracy": 0.5}]) == []
