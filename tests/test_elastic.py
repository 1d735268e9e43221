"""Learners resized in-job and restored from an in-memory snapshot: the driver's bookkeeping on a fake fleet.

The real-stack versions (1 -> 2 -> 1 ranks, a rank killed by pid) are in tests/test_elastic_stack.py.
"""

from __future__ import annotations

import json

import pytest

from innerloop.distributed import cli
from innerloop.distributed.cluster.fleet import SnapshotLost
from innerloop.distributed.cluster.placement import ranks_fit
from innerloop.distributed.config import ConfigError
from innerloop.distributed.config_load import load_config
from innerloop.distributed.run.driver import Trainer
from innerloop.distributed.state.tracking import RunDir
from tests.doubles import FakeFleet


def config(*overrides):
    # 16 samples a step, 4 per micro-batch: 1, 2 or 4 ranks split it evenly
    return load_config(None, ["train.steps=6", "train.checkpoint_every=3", "eval.before_and_after=false",
                              "train.max_minutes=0", "tasks.train_count=100", "tasks.eval_count=8",
                              "train.export_final_model=false", "rollout.questions_per_step=4",
                              "rollout.group_size=4", "learner.micro_batch_size=4", *overrides])


class ElasticFleet(FakeFleet):
    """FakeFleet with the in-job calls: its "weights" (updates applied) move with its checkpoints and
    snapshots like real learner state; fresh ranks hold none."""

    def __init__(self, cfg, lose_snapshot=False, cluster_ranks=4, **kwargs):
        super().__init__(cfg, **kwargs)
        self.lose_snapshot, self.cluster_ranks = lose_snapshot, cluster_ranks
        self.resized: list[int] = []
        self.loads: list[int | None] = []  # saved_ranks of each checkpoint load
        self.snapshots = 0

    def learner_fit_problems(self, ranks):
        return [] if ranks <= self.cluster_ranks else [f"{ranks} CPUs needed, {self.cluster_ranks} in the cluster"]

    def resize_learners(self, ranks):
        self.resized.append(ranks)
        self.learner_ranks, self.applied = ranks, 0

    def load_learners(self, folder, tag, saved_ranks=None):
        self.loads.append(saved_ranks)
        super().load_learners(folder, tag, saved_ranks)

    def snapshot_learners(self):
        self.snapshots += 1
        return [self.applied] * self.learner_ranks, 8 * self.learner_ranks

    def restore_learners(self, payloads):
        if self.lose_snapshot:
            raise SnapshotLost("the node holding it died (test double)")
        self.applied = payloads[0]


def events(run_dir, name):
    return [r for r in RunDir(run_dir).read_metrics() if r.get("event") == name]


def ledger(run_dir):
    return [(r["step"], tuple(r["questions"])) for r in RunDir(run_dir).read_ledger()]


def test_a_rank_schedule_checkpoints_restarts_and_reloads_resharded_before_its_steps(tmp_path):
    cfg = config("learner.rank_schedule={2: 2, 4: 1}", "train.keep_checkpoints=5")
    plain = tmp_path / "plain"
    Trainer(config(), plain).train(ElasticFleet(config()))
    fleet = ElasticFleet(cfg)
    Trainer(cfg, tmp_path / "run").train(fleet)

    assert fleet.resized == [2, 1]
    assert fleet.loads == [1, 2]  # step 2's checkpoint written by 1 rank, step 4's by 2: each resharded
    assert fleet.applied == 6  # nothing lost or redone: fresh ranks took every update from the checkpoint
    scaled = events(tmp_path / "run", "learner_ranks_scaled")
    assert [(r["step"], r["from"], r["to"]) for r in scaled] == [(2, 1, 2), (4, 2, 1)]
    assert all(r["seconds"] >= 0 and {"checkpoint_seconds", "restart_seconds", "load_seconds", "sync_seconds"} <= set(r)
               for r in scaled)
    saved = {p.name: json.loads((p / "state.json").read_text())["extra"]["learner_ranks"]
             for p in (tmp_path / "run" / "checkpoints").iterdir()}
    assert saved == {"step-000002": 1, "step-000003": 2, "step-000004": 2, "step-000006": 1}
    assert ledger(tmp_path / "run") == ledger(plain)  # the same questions in the same steps


def test_innerloop_scale_learner_ranks_takes_effect_before_the_next_step(tmp_path, capsys):
    cfg = config()
    fleet = ElasticFleet(cfg)
    ranks = []

    def during_update(call):
        ranks.append(fleet.learner_ranks)
        if call == 2:  # a user asks while step 2 updates
            assert cli.main(["scale", str(tmp_path / "run"), "--learner-ranks", "2", "--rollout-workers", "2"]) == 0

    fleet.on_update = during_update
    Trainer(cfg, tmp_path / "run").train(fleet)
    assert ranks == [1, 1, 2, 2, 2, 2] and len(fleet.workers) == 2  # both applied before step 3, once
    assert "2 rollout workers and 2 learner ranks" in capsys.readouterr().out
    [scaled] = events(tmp_path / "run", "learner_ranks_scaled")
    assert scaled["step"] == 2 and fleet.loads == [1] and fleet.applied == 6
    # Step 2 is off the cadence (every 3): the resize wrote its own checkpoint to reload from.
    assert [r["step"] for r in events(tmp_path / "run", "checkpoint")] == [2, 3, 6]
    assert not (tmp_path / "run" / "scale.json").exists()


def test_a_count_the_cluster_cannot_place_is_refused_and_the_run_goes_on(tmp_path):
    cfg = config("learner.rank_schedule={2: 4}")
    fleet = ElasticFleet(cfg, cluster_ranks=2)
    result = Trainer(cfg, tmp_path / "run").train(fleet)
    assert result.steps_done == 6 and fleet.resized == [] and fleet.learner_ranks == 1
    [refused] = events(tmp_path / "run", "learner_ranks_refused")
    assert refused["to"] == 4 and "4 CPUs needed, 2 in the cluster" in refused["reason"]


def test_the_cluster_check_counts_learner_ranks_beside_the_rollout_workers():
    cfg = config()
    assert ranks_fit(cfg, 2, 1, {"CPU": 8.0}) == []
    [problem] = ranks_fit(cfg, 4, 2, {"CPU": 4.0})
    assert "learner.ranks=4 and rollout.workers=2 do not fit: 6 CPUs needed, 4 in the cluster" in problem


def test_scale_refuses_bad_input_with_a_clear_message(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(config("train.steps=1"), run).train(ElasticFleet(config()))  # a run directory, finished: no lock
    cases = [
        (["scale", str(run)], "give --rollout-workers N, --learner-ranks N, or both"),
        (["scale", str(run), "--learner-ranks", "0"], "--learner-ranks must be at least 1 (got 0)"),
        (["scale", str(tmp_path / "nowhere"), "--learner-ranks", "2"], "is not a run directory"),
        (["scale", str(run), "--learner-ranks", "2"], "no job is training in"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2
        assert message in capsys.readouterr().err
    assert not (run / "scale.json").exists()


def test_scale_refuses_a_rank_count_that_does_not_split_the_batch(tmp_path, capsys):
    cfg = config()
    fleet = ElasticFleet(cfg)
    answers = []
    fleet.on_update = lambda call: answers.append(cli.main(["scale", str(tmp_path / "run"), "--learner-ranks", "3"]))
    Trainer(cfg, tmp_path / "run").train(fleet)
    assert set(answers) == {2} and fleet.resized == []
    err = capsys.readouterr().err
    assert "--learner-ranks 3 does not fit this run's config" in err and "learner.ranks x learner.micro_batch_size = 12" in err


def test_a_rank_schedule_is_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"learner.rank_schedule \{3: 0\}: steps must be >= 0 and rank counts >= 1"):
        config("learner.rank_schedule={3: 0}")
    with pytest.raises(ConfigError, match=r"learner.rank_schedule \{3: 3\}: with 3 ranks, .* must divide evenly"):
        config("learner.rank_schedule={3: 3}")


def test_with_a_snapshot_a_dead_rank_costs_no_step(tmp_path):
    cfg = config("recovery.learner_snapshot=true")
    Trainer(cfg, tmp_path / "plain").train(ElasticFleet(cfg))
    fleet = ElasticFleet(cfg, lose_learner_at=[5])  # step 5's update: the last checkpoint is step 3's
    Trainer(cfg, tmp_path / "lost").train(fleet)

    assert fleet.restarts == 1 and fleet.applied == 6 and fleet.update_calls == 7  # only the update cut short
    [event] = events(tmp_path / "lost", "learners_restarted")
    assert (event["step"], event["restored_from"], event["steps_lost"]) == (4, "snapshot", 0)
    assert not (tmp_path / "lost" / "superseded.jsonl").exists()  # nothing logged had to be taken back
    assert ledger(tmp_path / "lost") == ledger(tmp_path / "plain")
    steps = [r for r in RunDir(tmp_path / "lost").read_metrics() if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6] and all("time_snapshot" in r for r in steps)


def test_a_lost_snapshot_falls_back_to_the_last_checkpoint(tmp_path):
    cfg = config("recovery.learner_snapshot=true")
    fleet = ElasticFleet(cfg, lose_learner_at=[5], lose_snapshot=True)
    Trainer(cfg, tmp_path / "run").train(fleet)
    [event] = events(tmp_path / "run", "learners_restarted")
    assert (event["step"], event["restored_from"], event["steps_lost"]) == (3, "checkpoint", 1)
    assert fleet.restarts == 2  # once more after the failed load: no rank is left half-loaded
    assert fleet.applied == 6
    assert [r["step"] for r in RunDir(tmp_path / "run").read_metrics() if "event" not in r] == [1, 2, 3, 4, 5, 6]


def test_without_snapshots_a_dead_rank_costs_the_steps_since_the_checkpoint(tmp_path):
    cfg = config()
    fleet = ElasticFleet(cfg, lose_learner_at=[6])  # step 6's update: steps 4 and 5 were done since step 3's
    Trainer(cfg, tmp_path / "run").train(fleet)
    [event] = events(tmp_path / "run", "learners_restarted")
    assert (event["restored_from"], event["steps_lost"]) == ("checkpoint", 2) and fleet.snapshots == 0


def test_snapshot_files_round_trip_and_never_leave_their_folder(tmp_path):
    from innerloop.learners import snapshot_files

    with snapshot_files.scratch_folder() as folder:
        (folder / "snapshot").mkdir()
        (folder / "snapshot" / "mp_rank_00_model_states.pt").write_bytes(b"model")
        (folder / "latest").write_text("snapshot")
        files = snapshot_files.read_files(folder)
    assert files == {"latest": b"snapshot", "snapshot/mp_rank_00_model_states.pt": b"model"}
    assert not folder.exists()  # the scratch is removed
    snapshot_files.write_files(files, tmp_path / "back")
    assert snapshot_files.read_files(tmp_path / "back") == files
    with pytest.raises(ValueError, match="outside its folder"):
        snapshot_files.write_files({"../escaped": b"x"}, tmp_path / "back")
    assert not (tmp_path / "escaped").exists()
