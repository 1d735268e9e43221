"""What a run does besides GRPO steps, on a fake fleet: the SFT stage before GRPO (sft.steps: the
hand-off, the balanced batches, the saved set a resume reuses) and the inner-loop probe's cadence
(probe.every_steps). The real learner's SFT step and probe are in tests/test_integration.py."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from innerloop.distributed.config import ConfigError

from innerloop.distributed.config_load import load_config
from innerloop.distributed.run.driver import Trainer
from innerloop.distributed.run.sft_stage import SET_FILE
from innerloop.distributed.state.tracking import RunDir
from tests.doubles import FakeFleet

pytest.importorskip("transformers")


def config(tiny_tokenizer_model, *overrides):
    return load_config(None, ["train.steps=3", "train.checkpoint_every=2", "eval.before_and_after=false",
                              "train.max_minutes=0", "tasks.train_count=20", "tasks.eval_count=8",
                              "train.export_final_model=false", f"model.name={tiny_tokenizer_model}",
                              "sft.steps=4", "sft.questions_per_step=8", "sft.distinct=2", *overrides])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")  # the tokenizer is what the stage uses


def test_sft_steps_come_first_then_grpo_takes_over_in_one_run(tmp_path, tiny):
    cfg = config(tiny)
    fleet = FakeFleet(cfg)
    result = Trainer(cfg, tmp_path / "run").train(fleet)
    run = RunDir(tmp_path / "run")
    records = [r for r in run.read_metrics() if "event" not in r]
    assert result.steps_done == 7
    assert [r["stage"] for r in records] == ["sft"] * 4 + ["grpo"] * 3
    assert fleet.sft_batches == [16] * 4  # 8 questions x k=2 trajectories each
    assert fleet.synced[:5] == [0, 1, 2, 3, 4]  # the engines hold the SFT weights when GRPO starts
    assert {line["step"] for line in run.read_trajectories()} == {5, 6, 7}  # rollouts only in GRPO steps


def test_every_question_of_the_sft_set_is_seen_equally_often(tmp_path, tiny):
    cfg = config(tiny, "sft.steps=5", "sft.questions_per_step=4", "tasks.train_count=10", "train.steps=1",
                 "learner.micro_batch_size=8")
    Trainer(cfg, tmp_path / "run").train(FakeFleet(cfg))
    ledger = RunDir(tmp_path / "run").read_ledger()
    seen = Counter(q for entry in ledger[:5] for q in entry["questions"])
    assert len(seen) == 10 and set(seen.values()) == {2}  # 5 steps x 4 = two epochs over 10 questions
    saved = [json.loads(line) for line in (tmp_path / "run" / SET_FILE).read_text().splitlines()]
    assert Counter(line["question_id"] for line in saved) == Counter({q: 2 for q in seen})  # k = 2 each
    assert all("\\boxed{" in line["completion"] for line in saved)  # the generator's worked solutions


def test_sft_rows_pad_each_question_so_the_batch_is_questions_x_rows(tmp_path, tiny):
    cfg = config(tiny, "sft.steps=2", "sft.questions_per_step=2", "sft.rows=4", "train.steps=1",
                 "learner.micro_batch_size=8")
    fleet = FakeFleet(cfg)
    Trainer(cfg, tmp_path / "run").train(fleet)
    assert fleet.sft_batches == [8, 8]  # 2 questions x 4 rows, whatever sft.distinct is
    saved = [json.loads(line) for line in (tmp_path / "run" / SET_FILE).read_text().splitlines()]
    assert set(Counter(line["question_id"] for line in saved).values()) == {4}


def test_a_resume_inside_the_sft_stage_reuses_the_saved_set(tmp_path, tiny):
    cfg = config(tiny, "train.keep_checkpoints=10", "train.keep_best=0")
    Trainer(cfg, tmp_path / "plain").train(FakeFleet(cfg))
    Trainer(cfg, tmp_path / "cut").train(FakeFleet(cfg))
    for path in (tmp_path / "cut" / "checkpoints").glob("step-*"):
        if int(path.name.split("-")[1]) > 2:
            shutil.rmtree(path)  # as if killed after step 2's checkpoint, inside the SFT stage
    saved_set = (tmp_path / "cut" / SET_FILE).read_text()
    resumed = FakeFleet(cfg)
    Trainer(cfg, tmp_path / "cut", resume=True).train(resumed)
    assert RunDir(tmp_path / "cut").read_ledger() == RunDir(tmp_path / "plain").read_ledger()
    assert resumed.sft_batches == [16, 16]  # SFT steps 3 and 4, then GRPO
    assert (tmp_path / "cut" / SET_FILE).read_text() == saved_set


def test_sft_config_errors_name_the_fix(tiny):
    with pytest.raises(ConfigError, match="set sft.path=FILE.jsonl"):
        load_config(None, ["sft.steps=1", "sft.source=file"])
    with pytest.raises(ConfigError, match="set sft.teacher=MODEL"):
        load_config(None, ["sft.steps=1", "sft.source=teacher"])
    with pytest.raises(ConfigError, match="samples per SFT step must divide"):
        load_config(None, ["sft.steps=1", "sft.questions_per_step=3"])


def test_the_probe_cadence_writes_curves_and_logs_their_summaries(tmp_path, tiny):
    cfg = config(tiny, "sft.steps=0", "train.steps=5", "probe.every_steps=2", "probe.questions=3",
                 "probe.samples=2", "probe.every=1")
    fleet = FakeFleet(cfg)
    Trainer(cfg, tmp_path / "run").train(fleet)
    assert fleet.probed == [6, 6, 6]  # steps 0, 2 and 4: 3 questions x 2 trajectories each
    lines = [json.loads(x) for x in (tmp_path / "run" / "probe" / "probe.jsonl").read_text().splitlines()]
    assert Counter(line["label"] for line in lines) == {"step-0": 6, "step-2": 6, "step-4": 6}
    assert {png.name for png in (tmp_path / "run" / "probe").glob("*.png")} == {
        "curves-step-0.png", "curves-step-2.png", "curves-step-4.png"}
    run = RunDir(tmp_path / "run")
    events = [r for r in run.read_metrics() if r.get("event") == "probe"]
    assert [e["step"] for e in events] == [0, 2, 4]
    assert all(e["probe_correct_slope"] < 0 and e["probe_incorrect_slope"] == 0 for e in events)
    steps = [r for r in run.read_metrics() if "event" not in r]
    assert ["time_probe" in r for r in steps] == [True, False, True, False, True]


def test_a_probe_suffix_without_the_answer_slot_is_refused(tiny):
    with pytest.raises(ConfigError, match="must hold {answer} exactly once"):
        load_config(None, ["probe.suffix=The answer is"])


def test_a_broken_trajectory_file_stops_before_any_step_naming_the_line(tmp_path, tiny):
    bad = tmp_path / "trajectories.jsonl"
    bad.write_text('{"question_id": "q1", "prompt": "What is 1 + 1?", "answer": "2"}\n')  # no completion
    cfg = config(tiny, "sft.source=file", f"sft.path={bad}", "tasks.on_bad_row=fail")
    fleet = FakeFleet(cfg)
    with pytest.raises(ConfigError, match="sft: .*line 1"):
        Trainer(cfg, tmp_path / "run").train(fleet)
    assert fleet.update_calls == 0


def test_a_run_draws_the_sampled_eval_after_training_when_asked(tmp_path, tiny):
    from innerloop.distributed.lens.sampled_eval import read_sampled_questions

    cfg = config(tiny, "sft.steps=0", "train.steps=1", "eval.before_and_after=true", "eval.sampled.in_training=after",
                 "eval.sampled.questions=3")
    fleet = FakeFleet(cfg)
    Trainer(cfg, tmp_path / "run").train(fleet)
    records = RunDir(tmp_path / "run").read_metrics()
    before, after = (next(r for r in records if r.get("event") == e) for e in ("eval_before", "eval_after"))
    assert "eval_pass@8" not in before and after["eval_sampled_questions"] == 3 and after["eval_sampled_samples"] == 8
    assert after["eval_pass@8"] == 1.0  # the fake engine gets every other sample right
    assert fleet.seeds[-1] == 0  # the sampled eval's fixed seed
    assert {n for n, _, _ in read_sampled_questions(tmp_path / "run").values()} == {8}
