"""`innerloop eval`'s reporting without an engine: trajectories -> (n, c) per question -> Avg@n,
Pass@k, mG-Pass@k; the printed lines, the --json file, and the eval.samples / eval.pass_k checks."""

from __future__ import annotations

import json

import pytest

from innerloop.distributed import cli

from innerloop.distributed.lens import evaluate
from innerloop.distributed.config import ConfigError
from innerloop.distributed.config_load import load_config
from innerloop.distributed.lens.evaluate import format_report, report_from_trajectories
from innerloop.distributed.records import Trajectory


def trajectory(qid: str, correct: bool, formatted: bool = True) -> Trajectory:
    return Trajectory(question_id=qid, prompt_ids=(1,), completion_ids=(2,), logprobs=(-0.1,),
                      finish_reason="stop", text="", reward=1.0 if correct else -1.0, correct=correct,
                      formatted=formatted, policy_version=0)


def four_samples_each() -> list[Trajectory]:
    """Question a: 2 of 4 right; b: none; c: all 4 (the last one unformatted). Order as the engine returns."""
    return ([trajectory("a", ok) for ok in (True, False, True, False)]
            + [trajectory("b", False) for _ in range(4)]
            + [trajectory("c", True, formatted=i < 3) for i in range(4)])


def test_report_counts_each_question_once_and_scores_it():
    report = report_from_trajectories(four_samples_each(), [1, 2, 4])
    assert (report.questions, report.trajectories, report.correct) == (3, 12, 6)
    assert report.accuracy == 0.5 and report.formatted == 11 / 12
    assert report.passk.samples == 4 and report.passk.avg_at_n == 0.5
    scores = {s.k: s for s in report.passk.by_k}
    assert scores[1].pass_at_k == pytest.approx(0.5)
    assert scores[2].pass_at_k == pytest.approx((5 / 6 + 0 + 1) / 3)  # a: 1 - C(2,2)/C(4,2)
    assert scores[4].pass_at_k == pytest.approx(2 / 3)  # a and c have a right answer among all 4
    assert scores[2].mg_pass_at_k == pytest.approx((1 / 6 + 0 + 1) / 3)  # a: both drawn right, 1/6
    assert scores[4].mg_pass_at_k == pytest.approx(1 / 3)  # only c has >= 3 of 4 right


def test_interleaved_trajectories_are_grouped_by_question():
    shuffled = [trajectory(q, ok) for q, ok in [("a", True), ("b", False), ("a", False), ("b", False)]]
    report = report_from_trajectories(shuffled, [2])
    assert report.questions == 2 and report.passk.samples == 2
    assert report.passk.by_k[0].pass_at_k == 0.5  # a has a right one among its 2, b does not


def test_no_trajectories_is_refused_clearly():
    with pytest.raises(ValueError, match="no trajectories"):
        report_from_trajectories([], [1])


def test_printed_report_keeps_the_accuracy_line_and_adds_each_k():
    text = format_report(report_from_trajectories(four_samples_each(), [1, 4]), "some/model")
    lines = text.splitlines()
    assert lines[0] == "held-out accuracy of some/model: 50.0% (6/12; 91.7% formatted)"
    assert lines[1] == "3 questions x 4 samples: Avg@4 50.0%"
    assert lines[2] == "  Pass@1 50.0%"  # mG-Pass@1 is 0 by definition: left out
    assert lines[3] == "  Pass@4 66.7%  mG-Pass@4 33.3%"


def test_one_greedy_sample_reads_as_before():
    report = report_from_trajectories([trajectory(str(i), i < 3) for i in range(12)], [1])
    assert "held-out accuracy of m: 25.0% (3/12;" in format_report(report, "m")


def test_eval_command_prints_and_writes_json(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_evaluate(cfg, model):
        seen["cfg"] = cfg
        return report_from_trajectories(four_samples_each(), cfg.eval.pass_k)

    monkeypatch.setattr(evaluate, "evaluate_model", fake_evaluate)
    out = tmp_path / "report.json"
    code = cli.main(["eval", "m", "--json", str(out), "--set", "eval.samples=4",
                     "--set", "eval.temperature=0.7", "--set", "eval.pass_k=[1,4]"])
    assert code == 0
    assert seen["cfg"].eval.samples == 4
    assert "Pass@4 66.7%  mG-Pass@4 33.3%" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["model"] == "m" and written["questions"] == 3 and written["samples"] == 4
    assert written["pass@4"] == pytest.approx(2 / 3) and written["mg_pass@4"] == pytest.approx(1 / 3)


def test_eval_json_into_a_missing_folder_fails_before_any_engine(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "evaluate_model", lambda cfg, model: pytest.fail("engine started"))
    code = cli.main(["eval", "m", "--json", str(tmp_path / "nowhere" / "report.json")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- eval.samples and eval.pass_k


def test_defaults_are_one_sample_and_pass_at_1():
    cfg = load_config()
    assert cfg.eval.samples == 1 and cfg.eval.pass_k == [1]


def test_several_samples_with_sampling_and_ks_up_to_n_load():
    cfg = load_config(None, ["eval.samples=8", "eval.temperature=0.6", "eval.pass_k=[1, 4, 8]"])
    assert cfg.eval.samples == 8 and cfg.eval.pass_k == [1, 4, 8]


def test_k_above_samples_names_both_keys_and_the_fix():
    with pytest.raises(ConfigError, match=r"k=8.*eval\.samples = 4; set eval\.samples to at least 8"):
        load_config(None, ["eval.samples=4", "eval.temperature=0.6", "eval.pass_k=[1, 8]"])


def test_k_below_one_is_refused():
    with pytest.raises(ConfigError, match="k=0; every k must be at least 1"):
        load_config(None, ["eval.pass_k=[0]"])


def test_several_greedy_samples_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"greedy .* set eval\.temperature above 0"):
        load_config(None, ["eval.samples=4"])
