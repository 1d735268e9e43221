"""The driver's plain parts on the CPU: samples and advantages, batching, the question stream,
checkpoint folders, the run directory and the progress line."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from innerloop.distributed.state import checkpoints
from innerloop.distributed.config import AlgorithmConfig
from innerloop.distributed.config_load import load_config
from innerloop.distributed.run.progress import format_step
from innerloop.distributed.run.questions import QuestionStream
from innerloop.distributed.records import Question, TrainingSample, Trajectory
from innerloop.distributed.run.samples import build_samples, group_advantages, group_by_question, loss_normalizers
from innerloop.distributed.state.tracking import RunDir
from innerloop.learners.batching import collate, micro_batches, shard_for_rank

STD = AlgorithmConfig(advantage_scale="std")
NO_SCALE = AlgorithmConfig(advantage_scale="none")


def samples_of(groups, algorithm, **kwargs):
    """The driver's two phases: advantages within each group, then one training sample per trajectory."""
    return build_samples(groups, group_advantages(groups, algorithm), algorithm, **kwargs)


def trajectory(qid: str, reward: float, prompt=(1, 2, 3), completion=(4, 5), logprobs=None) -> Trajectory:
    logprobs = tuple(-0.1 * (i + 1) for i in range(len(completion))) if logprobs is None else logprobs
    return Trajectory(question_id=qid, prompt_ids=tuple(prompt), completion_ids=tuple(completion),
                      logprobs=tuple(logprobs), finish_reason="stop", text="", reward=reward,
                      correct=reward > 0, formatted=True, policy_version=0)


def sample(length: int, completion: int | None = None, advantage: float = 0.0, tag: int = 0,
           update: bool = True) -> TrainingSample:
    """`length` tokens, the last `completion` of them carrying loss; `tag` makes ids distinct."""
    completion = length // 2 if completion is None else completion
    prompt = length - completion
    return TrainingSample(
        input_ids=tuple(100 * tag + i + 1 for i in range(length)),
        loss_mask=(0,) * prompt + (1,) * completion,
        sampler_logprobs=(0.0,) * prompt + tuple(-0.5 - i for i in range(completion)),
        advantage=advantage, update=update)


# ---------------------------------------------------------------- trajectories -> samples


def test_advantages_for_hand_made_groups_std():
    groups = [
        [trajectory("a", r) for r in (1.0, 0.0, 0.0, 0.0)],  # mean .25, sample std .5
        [trajectory("b", r) for r in (1.0, 1.0, 1.0, 1.0)],  # no variance: exactly zero
        [trajectory("c", r) for r in (2.0, 0.0, 1.0, 1.0)],  # mean 1, sample std sqrt(2/3)
    ]
    got = [s.advantage for s in samples_of(groups, STD)]
    s = math.sqrt(2 / 3)
    want = [1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0, 1 / s, -1 / s, 0.0, 0.0]
    assert got == pytest.approx(want, abs=1e-5)
    assert got[4:8] == [0.0] * 4  # exact, not merely close


def test_advantages_for_hand_made_groups_no_scale():
    groups = [[trajectory("a", r) for r in (1.0, 0.0, 0.0, 0.0)],
              [trajectory("b", r) for r in (-1.0, 0.5, 0.5, 0.0)]]
    got = [s.advantage for s in samples_of(groups, NO_SCALE)]
    assert got == pytest.approx([0.75, -0.25, -0.25, -0.25, -1.0, 0.5, 0.5, 0.0], abs=1e-6)


def test_each_advantage_follows_its_own_trajectory():
    # The best trajectory of each group gets the largest advantage, wherever it sits in the group.
    groups = [[trajectory("a", r, completion=(10 + i,)) for i, r in enumerate(rewards)]
              for rewards in [(0.0, 0.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)]]
    samples = samples_of(groups, STD)
    for group, chunk in zip(groups, [samples[0:3], samples[3:6], samples[6:9]]):
        best = max(range(3), key=lambda i: group[i].reward)
        assert max(range(3), key=lambda i: chunk[i].advantage) == best
        assert [s.input_ids[-1] for s in chunk] == [t.completion_ids[-1] for t in group]


def test_sample_masks_and_sampler_logprobs_line_up():
    t = trajectory("q", 1.0, prompt=(7, 8, 9, 10), completion=(11, 12, 13), logprobs=(-0.1, -0.2, -0.3))
    [s, _] = samples_of([[t, trajectory("q", 0.0)]], STD)
    assert s.input_ids == (7, 8, 9, 10, 11, 12, 13)
    assert s.loss_mask == (0, 0, 0, 0, 1, 1, 1)
    assert s.sampler_logprobs == (0.0, 0.0, 0.0, 0.0, -0.1, -0.2, -0.3)
    assert len(s.input_ids) == len(s.loss_mask) == len(s.sampler_logprobs)
    assert s.update is True


def test_unequal_group_sizes_raise():
    groups = [[trajectory("a", 1.0), trajectory("a", 0.0)], [trajectory("b", 1.0)]]
    with pytest.raises(ValueError, match=r"same number of trajectories.*\[1, 2\]"):
        group_advantages(groups, STD)


def test_group_by_question_keeps_first_seen_order():
    ts = [trajectory("b", 0.0), trajectory("a", 1.0), trajectory("b", 2.0), trajectory("c", 3.0),
          trajectory("a", 4.0)]
    groups = group_by_question(ts)
    assert [[t.question_id for t in g] for g in groups] == [["b", "b"], ["a", "a"], ["c"]]
    assert [[t.reward for t in g] for g in groups] == [[0.0, 2.0], [1.0, 4.0], [3.0]]


def test_loss_normalizers_count_tokens_or_sequences():
    samples = [sample(6, completion=3), sample(5, completion=2), sample(4, completion=0),
               sample(7, completion=4, update=False)]
    token = loss_normalizers(samples, AlgorithmConfig(aggregation="token"))
    assert token.aggregation == "token"
    assert token.policy == 3 + 2  # the update=False sample gets no policy-gradient term
    assert token.regularizer == 3 + 2 + 4  # KL and entropy still cover it
    sequence = loss_normalizers(samples, AlgorithmConfig(aggregation="sequence"))
    assert sequence.policy == 2  # a sequence without loss tokens does not count
    assert sequence.regularizer == 3


# ---------------------------------------------------------------- batching


def test_collate_pads_right_with_pad_id():
    a, b = sample(5, completion=2, advantage=1.5), sample(3, completion=1, advantage=-0.5, tag=1, update=False)
    batch = collate([a, b], pad_id=-7)
    for name in ("input_ids", "attention_mask", "loss_mask", "sampler_logprobs"):
        assert getattr(batch, name).shape == (2, 5), name
    assert batch.advantages.shape == batch.update_mask.shape == (2,)
    assert batch.input_ids.dtype == torch.long and batch.loss_mask.dtype == torch.float32
    assert batch.input_ids.tolist() == [list(a.input_ids), [*b.input_ids, -7, -7]]
    assert batch.attention_mask.tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert batch.loss_mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0]]
    assert batch.sampler_logprobs.tolist() == [[0, 0, 0, -0.5, -1.5], [0, 0, -0.5, 0, 0]]
    assert batch.advantages.tolist() == [1.5, -0.5]
    assert batch.update_mask.tolist() == [True, False]


def test_collate_width_is_the_longest_in_this_micro_batch():
    assert collate([sample(2), sample(4, tag=1)], pad_id=0).input_ids.shape == (2, 4)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_for_rank_same_count_and_every_sample_once(world_size):
    samples = [sample(3 + (7 * i) % 11, tag=i) for i in range(12)]
    shards = [shard_for_rank(samples, rank, world_size) for rank in range(world_size)]
    assert {len(s) for s in shards} == {12 // world_size}
    seen = Counter(s.input_ids for shard in shards for s in shard)
    assert seen == Counter(s.input_ids for s in samples)  # all samples, each exactly once


def test_shard_for_rank_balances_lengths():
    samples = [sample(n, tag=n) for n in range(2, 18)]  # 16 samples, lengths 2..17
    tokens = [sum(len(s.input_ids) for s in shard_for_rank(samples, r, 4)) for r in range(4)]
    assert max(tokens) - min(tokens) <= 3 * 4  # round-robin over sorted lengths


def test_micro_batches_sizes_and_order():
    samples = [sample(3, tag=i) for i in range(10)]
    batches = micro_batches(samples, 4)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert [s for b in batches for s in b] == samples
    assert [len(b) for b in micro_batches(samples, 5)] == [5, 5]


# ---------------------------------------------------------------- the question stream

QUESTIONS = [Question(question_id=f"q{i}", prompt=f"What is {i} + 1?", answer=str(i + 1)) for i in range(7)]


def ids(questions: list[Question]) -> list[str]:
    return [q.question_id for q in questions]


def test_stream_is_deterministic_for_a_seed():
    a, b = QuestionStream(QUESTIONS, seed=3), QuestionStream(QUESTIONS, seed=3)
    assert [ids(a.take(5)) for _ in range(4)] == [ids(b.take(5)) for _ in range(4)]
    other = QuestionStream(QUESTIONS, seed=4)
    assert [ids(QuestionStream(QUESTIONS, seed=3).take(7)) for _ in range(3)] != [ids(other.take(7)) for _ in range(3)]


def test_stream_restarted_at_its_position_continues_identically():
    full = QuestionStream(QUESTIONS, seed=1)
    first = full.take(5)
    assert full.position == 5
    rest = [ids(full.take(n)) for n in (4, 6, 7)]  # crosses epoch boundaries
    restarted = QuestionStream(QUESTIONS, seed=1, position=5)
    assert [ids(restarted.take(n)) for n in (4, 6, 7)] == rest
    assert restarted.position == full.position >= 22
    assert len(first) == 5


def test_every_question_once_per_epoch_in_a_fresh_order():
    stream = QuestionStream(QUESTIONS, seed=0)
    epochs = [ids(stream.take(len(QUESTIONS))) for _ in range(4)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(ids(QUESTIONS))
    assert len({tuple(e) for e in epochs}) > 1  # each epoch is reshuffled


# ---------------------------------------------------------------- checkpoints


def make_checkpoint(root: Path, name: str, complete: bool = True) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    if complete:
        (folder / "state.json").write_text("{}")
    return folder


def test_latest_ignores_partial_and_incomplete_folders(tmp_path):
    assert checkpoints.latest(tmp_path / "missing") is None
    assert checkpoints.latest(tmp_path) is None
    make_checkpoint(tmp_path, "step-000010")
    expected = make_checkpoint(tmp_path, "step-000020")
    make_checkpoint(tmp_path, "step-000030", complete=False)  # crashed before state.json
    make_checkpoint(tmp_path, ".partial-step-000040")  # still being written
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert checkpoints.latest(tmp_path) == expected


def test_prune_keeps_the_last_n_complete(tmp_path):
    for step in (10, 20, 30, 40):
        make_checkpoint(tmp_path, f"step-{step:06d}")
    partial = make_checkpoint(tmp_path, ".partial-step-000050")
    checkpoints._prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".partial-step-000050", "step-000030", "step-000040"]
    assert partial.exists()
    checkpoints._prune(tmp_path, keep=1)
    assert checkpoints.latest(tmp_path).name == "step-000040"
    assert not (tmp_path / "step-000030").exists()


def test_model_folder(tmp_path):
    checkpoint = make_checkpoint(tmp_path, "step-000010")
    assert checkpoints.model_folder(checkpoint) == checkpoint  # no model/ inside: itself
    (checkpoint / "model").mkdir()
    (checkpoint / "model" / "config.json").write_text("{}")
    assert checkpoints.model_folder(checkpoint) == checkpoint / "model"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert checkpoints.model_folder(hf) == hf


class FakeFleet:
    """Writes what the learners would; `fail_export` simulates a crash mid-checkpoint."""

    def __init__(self, fail_export: bool = False):
        self.fail_export = fail_export
        self.loaded = None

    def save_learners(self, folder: Path, tag: str) -> None:
        folder.mkdir(parents=True)
        (folder / tag).write_text("weights")

    def export(self, folder: Path) -> None:
        if self.fail_export:
            raise RuntimeError("disk full")
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")

    def load_learners(self, folder: Path, tag: str, saved_ranks: int | None = None) -> None:
        self.loaded = (folder, tag)


def test_save_load_round_trip_and_crash_leaves_latest_intact(tmp_path):
    state = checkpoints.DriverState(step=10, policy_version=10, question_position=160, config_fingerprint="abc")
    saved = checkpoints.save(tmp_path, state, FakeFleet(), keep=2)
    assert saved == tmp_path / "step-000010" and checkpoints.latest(tmp_path) == saved
    assert checkpoints.model_folder(saved) == saved / "model"
    fleet = FakeFleet()
    assert checkpoints.load(saved, fleet) == state
    assert fleet.loaded == (saved / "deepspeed", "state")

    with pytest.raises(RuntimeError):
        checkpoints.save(tmp_path, dataclasses.replace(state, step=20), FakeFleet(fail_export=True), keep=2)
    assert checkpoints.latest(tmp_path) == saved  # the half-written step-20 is not "latest"

    for step in (20, 30):
        checkpoints.save(tmp_path, dataclasses.replace(state, step=step), FakeFleet(), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000020", "step-000030"]


# ---------------------------------------------------------------- run directory and progress line


def test_run_dir_log_writes_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunDir(tmp_path / "run")
    run.log({"reward_mean": 0.25, "accuracy": 0.5, "loss": float("nan"), "phase": "train"}, step=1)
    run.log({"reward_mean": 0.75, "accuracy": 1.0, "tokens": torch.tensor(12)}, step=2)
    run.close()

    lines = run.metrics_file.read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["step"] == 1 and first["reward_mean"] == 0.25 and first["phase"] == "train"
    assert math.isnan(first["loss"]) and isinstance(first["time"], float)
    assert second["step"] == 2 and second["tokens"] == 12  # a tensor is written as its number
    read = run.read_metrics()
    assert [r["step"] for r in read] == [1, 2] and read[1] == second

    events = list((run.path / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(run.path / "tensorboard"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert "reward_mean" in scalars and "accuracy" in scalars
    assert "loss" not in scalars and "step" not in scalars and "time" not in scalars  # nan, bookkeeping
    assert [(e.step, e.value) for e in acc.Scalars("reward_mean")] == [(1, 0.25), (2, 0.75)]


def test_run_dir_config_round_trips(tmp_path):
    cfg = load_config(None, ["rollout.temperature=0.7", "rollout.stop=[x]"])
    run = RunDir(tmp_path)
    run.write_config(cfg)
    text = (tmp_path / "config.yaml").read_text()
    assert cfg.fingerprint() in text.splitlines()[0]
    assert load_config(tmp_path / "config.yaml") == cfg  # the resolved config reruns the same run


def test_format_step():
    record = {"reward_mean": 0.5, "accuracy": 0.25, "formatted": 1.0, "completion_tokens_mean": 42.0,
              "generate_tokens_per_s": 1234.4, "time_generate": 3.21, "time_update": 4.0,
              "time_sync": 0.5, "time_other": 0.25, "loss": -0.01234, "kl": 0.002}
    line = format_step(7, record)
    assert line.startswith("step    7  reward +0.500  acc  25.0%  fmt 100.0%  len  42.0")
    assert "gen   1234 tok/s" in line and "gen   3.2s" in line and "upd   4.0s" in line
    assert "sync 0.50s" in line and "other 0.25s" in line
    assert line.endswith("loss -0.0123 kl 0.0020")
    missing = {k: v for k, v in record.items() if k not in ("loss", "kl")}
    assert format_step(7, missing).endswith("loss +nan kl nan")  # the first step may have no update yet


def test_a_take_across_an_epoch_boundary_never_repeats_a_question():
    pool = QUESTIONS  # 7: a take of 4 often straddles an epoch's end
    for seed in range(50):
        stream = QuestionStream(pool, seed=seed)
        for _ in range(10):
            taken = ids(stream.take(4))
            assert len(set(taken)) == 4
    with pytest.raises(ValueError, match="lower rollout.questions_per_step"):
        QuestionStream(pool, seed=0).take(8)
