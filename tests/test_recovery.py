"""The driver's recovery logic, on a fake fleet: learner loss, NaN steps, resume bookkeeping.

The real-stack versions (a worker or learner killed by pid, kill -9 of the whole job) are in
tests/test_integration.py and tests/test_resume.py; these pin down the bookkeeping in milliseconds.
"""

from __future__ import annotations

import json
import math

import pytest

from innerloop.distributed.state import checkpoints
from innerloop.distributed.config_load import load_config
from innerloop.distributed.run.driver import NonFiniteSteps, Trainer
from innerloop.distributed.state.tracking import RunDir
from tests.doubles import FakeFleet


def config(*overrides):
    return load_config(None, ["train.steps=6", "train.checkpoint_every=2", "eval.before_and_after=false",
                              "train.max_minutes=0", "tasks.train_count=100", "tasks.eval_count=8",
                              "train.export_final_model=false", *overrides])


def step_records(run_dir):
    return [r for r in RunDir(run_dir).read_metrics() if "event" not in r]


def ledger_steps(run_dir):
    return [(r["step"], tuple(r["questions"])) for r in RunDir(run_dir).read_ledger()]


def test_a_dead_learner_restores_the_last_checkpoint_and_every_step_is_logged_once(tmp_path):
    cfg = config()
    plain = Trainer(cfg, tmp_path / "plain").train(FakeFleet(cfg))
    fleet = FakeFleet(cfg, lose_learner_at=[4])  # step 4's update: the last checkpoint is step 2
    result = Trainer(cfg, tmp_path / "lost").train(fleet)

    assert result.steps_done == plain.steps_done == 6
    assert fleet.restarts == 1
    assert fleet.applied == 6  # 2 from the checkpoint + steps 3..6 redone: the lost step 3 is not counted twice
    assert [r["step"] for r in step_records(tmp_path / "lost")] == [1, 2, 3, 4, 5, 6]
    # Exactly once: the same questions, in the same steps, as the run that never failed.
    assert ledger_steps(tmp_path / "lost") == ledger_steps(tmp_path / "plain")
    superseded = [json.loads(line) for line in (tmp_path / "lost" / "superseded.jsonl").read_text().splitlines()]
    assert {(r["file"], r["step"]) for r in superseded} == {("metrics.jsonl", 3), ("ledger.jsonl", 3),
                                                             ("trajectories.jsonl", 3)}
    events = [r for r in RunDir(tmp_path / "lost").read_metrics() if r.get("event") == "learners_restarted"]
    assert len(events) == 1 and events[0]["step"] == 2 and "learner rank died" in events[0]["reason"]
    # The engines got the restored weights' version before generating again.
    assert fleet.synced[:5] == [0, 1, 2, 3, 2]  # 0: the start; 2: the restored checkpoint


def test_learner_deaths_beyond_the_limit_stop_with_a_clear_error(tmp_path):
    cfg = config("recovery.max_learner_restarts=1")
    with pytest.raises(RuntimeError, match=r"max_learner_restarts=1.*--resume"):
        Trainer(cfg, tmp_path / "run").train(FakeFleet(cfg, lose_learner_at=[3, 5]))
    assert checkpoints.verify(checkpoints.latest(tmp_path / "run" / "checkpoints")) == []


def test_a_dead_learner_before_any_checkpoint_starts_the_run_over(tmp_path):
    cfg = config("train.checkpoint_every=0", "train.steps=3")
    fleet = FakeFleet(cfg, lose_learner_at=[2])
    Trainer(cfg, tmp_path / "run").train(fleet)
    assert fleet.synced[:3] == [0, 1, 0]  # the restarted learners' initial weights go to the engines
    assert [r["step"] for r in step_records(tmp_path / "run")] == [1, 2, 3]
    assert fleet.applied == 3


def test_nonfinite_steps_are_skipped_saved_and_stop_the_run_at_the_limit(tmp_path):
    cfg = config("recovery.max_nonfinite_steps=2", "train.steps=10")
    fleet = FakeFleet(cfg, nonfinite_at=[2, 4])
    with pytest.raises(NonFiniteSteps, match=r"max_nonfinite_steps=2.*bad_steps"):
        Trainer(cfg, tmp_path / "run").train(fleet)
    assert fleet.applied == 2  # steps 1 and 3; steps 2 and 4 changed nothing
    saved = sorted(p.name for p in (tmp_path / "run" / "bad_steps").iterdir())
    assert saved == ["step-000002.jsonl", "step-000004.jsonl"]
    lines = (tmp_path / "run" / "bad_steps" / "step-000002.jsonl").read_text().splitlines()
    assert len(lines) == 1 + cfg.rollout.questions_per_step * cfg.rollout.group_size
    assert math.isnan(json.loads(lines[0])["update"]["loss"])
    skipped = [r["step"] for r in step_records(tmp_path / "run") if r["step_skipped"]]
    assert skipped == [2]  # step 4 stopped the run before it was logged


def test_one_nonfinite_step_below_the_limit_is_skipped_and_the_run_goes_on(tmp_path):
    cfg = config("recovery.max_nonfinite_steps=3")
    fleet = FakeFleet(cfg, nonfinite_at=[3])
    result = Trainer(cfg, tmp_path / "run").train(fleet)
    assert result.steps_done == 6 and fleet.applied == 5
    assert [r["step_skipped"] for r in step_records(tmp_path / "run")] == [0, 0, 1, 0, 0, 0]


def test_resume_continues_the_ledger_and_the_sampling_seeds(tmp_path):
    cfg = config()
    plain_fleet = FakeFleet(cfg)
    Trainer(cfg, tmp_path / "plain").train(plain_fleet)
    first = load_config(None, [*_as_overrides(cfg), "train.steps=3"])  # stops after step 3; checkpoint at 2, 3
    Trainer(first, tmp_path / "cut").train(FakeFleet(first))
    # As if killed right after step 3 was logged but before its checkpoint: drop that checkpoint.
    for path in (tmp_path / "cut" / "checkpoints").glob("step-000003"):
        import shutil

        shutil.rmtree(path)
    resumed = FakeFleet(cfg)
    Trainer(cfg, tmp_path / "cut", resume=True).train(resumed)
    assert ledger_steps(tmp_path / "cut") == ledger_steps(tmp_path / "plain")
    assert resumed.seeds == plain_fleet.seeds[2:]  # steps 3..6 draw the seeds they drew uninterrupted
    assert [r["step"] for r in step_records(tmp_path / "cut")] == [1, 2, 3, 4, 5, 6]


def _as_overrides(cfg) -> list[str]:
    return [f"train.{k}={v}" for k, v in cfg.train.model_dump().items() if k != "steps"] + [
        "eval.before_and_after=false", "tasks.train_count=100", "tasks.eval_count=8"]


def test_cli_lists_checkpoints_marks_the_best_and_flags_a_damaged_one(tmp_path, capsys):
    from innerloop.distributed import cli

    cfg = config("train.keep_checkpoints=5", "train.keep_best=1", "train.best_metric=policy_version",
                 "train.best_mode=min")
    Trainer(cfg, tmp_path / "run").train(FakeFleet(cfg))
    assert cli.main(["checkpoints", str(tmp_path / "run"), "--verify"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["step-000002", "step-000004", "step-000006"]
    assert "best" in lines[0] and all("verified" in line for line in lines)
    (tmp_path / "run" / "checkpoints" / "step-000004" / "deepspeed" / "state.txt").write_text("99")
    assert cli.main(["checkpoints", str(tmp_path / "run"), "--verify"]) == 1
    assert "DAMAGED" in capsys.readouterr().out


def test_resume_skips_a_damaged_newest_checkpoint_and_still_consumes_each_question_once(tmp_path):
    cfg = config("train.keep_checkpoints=3", "train.keep_best=0")
    Trainer(cfg, tmp_path / "run").train(FakeFleet(cfg))
    (tmp_path / "run" / "checkpoints" / "step-000006" / "state.json").write_text("{}")  # torn by a crash
    longer = load_config(None, [*_as_overrides(cfg), "train.steps=8"])
    Trainer(longer, tmp_path / "plain").train(FakeFleet(longer))
    fleet = FakeFleet(longer)
    Trainer(longer, tmp_path / "run", resume=True).train(fleet)
    assert fleet.applied == 8  # 4 from step-000004, then steps 5..8
    assert ledger_steps(tmp_path / "run") == ledger_steps(tmp_path / "plain")


def test_cli_offers_to_resume_a_run_dir_with_a_checkpoint_at_a_terminal(tmp_path, monkeypatch):
    from innerloop.distributed import cli
    from innerloop.distributed.run import driver

    cfg = config()
    Trainer(cfg, tmp_path / "run").train(FakeFleet(cfg))
    started = []

    class Recorded:
        def __init__(self, cfg, run_dir, address=None, resume=False):
            started.append((cfg.train.steps, resume))

        def prepare(self):
            pass

        def train(self):
            from innerloop.distributed.run.driver import TrainResult

            return TrainResult(6, None, None, None, 0.0)

    monkeypatch.setattr(driver, "Trainer", Recorded)
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "")
    assert cli.main(["train", "--run-dir", str(tmp_path / "run")]) == 0
    assert cli.main(["train", "--resume", str(tmp_path / "run")]) == 0
    # Both resumed, with the run's own config.yaml (its 6 steps, not the embedded demo's 40).
    assert started == [(6, True), (6, True)]
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert cli.main(["train", "--run-dir", str(tmp_path / "run")]) == 2


def test_innerloop_scale_resizes_the_rollout_pool_before_the_next_step(tmp_path, capsys):
    from innerloop.distributed import cli

    cfg = config()
    fleet = FakeFleet(cfg)
    sizes = []

    def during_update(call):
        sizes.append(len(fleet.workers))
        if call == 2:  # a user runs `innerloop scale` while step 2 is updating
            assert cli.main(["scale", str(tmp_path / "run"), "--rollout-workers", "3"]) == 0

    fleet.on_update = during_update
    Trainer(cfg, tmp_path / "run").train(fleet)
    assert sizes == [1, 1, 3, 3, 3, 3]  # applied before step 3, once
    assert not (tmp_path / "run" / "scale.json").exists()
    assert "3 rollout workers" in capsys.readouterr().out
    assert cli.main(["scale", str(tmp_path / "nowhere"), "--rollout-workers", "2"]) == 2
    assert cli.main(["scale", str(tmp_path / "run"), "--rollout-workers", "0"]) == 2
