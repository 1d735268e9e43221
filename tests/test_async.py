"""Asynchronous rollouts (rollout.asynchronous, max_staleness) on a fake fleet, and the truncated
importance weights stale trajectories carry. The real stack's run is in tests/test_integration.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from innerloop.distributed.records import PolicySums
from innerloop.distributed.state import checkpoints
from innerloop.distributed.config_load import load_config
from innerloop.distributed.run.driver import Trainer
from innerloop.distributed.state.tracking import RunDir
from innerloop.learners import grpo
from tests.doubles import FakeFleet


def config(*overrides):
    return load_config(None, ["train.steps=6", "train.checkpoint_every=2", "eval.before_and_after=false",
                              "train.max_minutes=0", "tasks.train_count=100", "tasks.eval_count=8",
                              "train.export_final_model=false", *overrides])


def run(tmp_path, name, *overrides):
    cfg = config(*overrides)
    fleet = FakeFleet(cfg)
    Trainer(cfg, tmp_path / name).train(fleet)
    return fleet, RunDir(tmp_path / name)


def staleness_by_step(run_dir: RunDir) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for line in run_dir.read_trajectories():
        out.setdefault(line["step"], set()).add(line["staleness"])
    return out


def test_staleness_bound_zero_is_the_synchronous_trainer(tmp_path):
    sync_fleet, sync_run = run(tmp_path, "sync")
    zero_fleet, zero_run = run(tmp_path, "zero", "rollout.asynchronous=true", "rollout.max_staleness=0")
    assert zero_fleet.seeds == sync_fleet.seeds and zero_fleet.synced == sync_fleet.synced
    assert zero_run.read_ledger() == sync_run.read_ledger()
    assert staleness_by_step(zero_run) == staleness_by_step(sync_run) == {s: {0} for s in range(1, 7)}
    assert zero_fleet.staleness == [[0]] * 6


@pytest.mark.parametrize("bound", [1, 2])
def test_asynchronous_trajectories_lag_by_at_most_the_bound_and_are_recorded(tmp_path, bound):
    sync_fleet, sync_run = run(tmp_path, "sync")
    fleet, async_run = run(tmp_path, "async", "rollout.asynchronous=true", f"rollout.max_staleness={bound}")
    # The first steps were generated before any update; from then on every batch is exactly `bound` behind.
    assert staleness_by_step(async_run) == {s: {min(s - 1, bound)} for s in range(1, 7)}
    assert fleet.staleness == [[min(s, bound)] for s in range(6)]  # the learner saw it on every sample
    # The same questions in the same steps with the same sampling seeds: only the weights used differ.
    assert async_run.read_ledger() == sync_run.read_ledger()
    assert fleet.seeds == sync_fleet.seeds
    records = [r for r in async_run.read_metrics() if "event" not in r]
    assert [r["staleness_max"] for r in records] == [min(s, bound) for s in range(6)]


def test_a_checkpoint_counts_only_trained_questions_so_a_resume_consumes_each_once(tmp_path):
    plain_fleet, plain = run(tmp_path, "plain", "rollout.asynchronous=true")
    cut = config("rollout.asynchronous=true", "train.steps=3")
    Trainer(cut, tmp_path / "cut").train(FakeFleet(cut))
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-000003")  # as if killed before step 3's checkpoint
    saved = checkpoints.latest_good(tmp_path / "cut" / "checkpoints")
    state = checkpoints.DriverState(**json.loads((saved / checkpoints.STATE).read_text()))
    assert state.step == 2 and state.question_position == 2 * cut.rollout.questions_per_step  # not step 3's
    cfg = config("rollout.asynchronous=true")
    Trainer(cfg, tmp_path / "cut", resume=True).train(FakeFleet(cfg))
    assert RunDir(tmp_path / "cut").read_ledger() == plain.read_ledger()


def test_truncated_importance_weights_cap_stale_rows_and_leave_fresh_rows_alone():
    current = torch.tensor([[0.0, -1.0, -0.1], [0.0, -1.0, -0.1]])
    sampler = torch.tensor([[0.0, -2.0, -0.05], [0.0, -2.0, -0.05]])
    weights = grpo.truncated_is_weights(current, sampler, torch.tensor([True, False]), cap=2.0)
    assert torch.allclose(weights[0], torch.tensor([1.0, 2.0, torch.exp(torch.tensor(-0.05)).item()]))
    assert torch.equal(weights[1], torch.ones(3))  # ratio e = 2.718 on a fresh row: not weighted


def test_the_policy_gradient_of_a_stale_token_is_scaled_by_its_weight():
    logprobs = torch.tensor([[0.0, -1.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1]])
    norms = grpo.loss_normalizers(mask, None, "token")
    common = dict(advantages=torch.tensor([1.0]), loss_mask=mask, update_mask=None, normalizers=norms,
                  clip_low=0.2, clip_high=0.28, aggregation="token")
    plain, _ = grpo.grpo_loss(logprobs=logprobs, old_logprobs=logprobs.detach(), **common)
    (plain_grad,) = torch.autograd.grad(plain, logprobs)
    weights = torch.tensor([[5.0, 0.5, 2.0]])  # position 0 is the prompt: its weight must not matter
    weighted, metrics = grpo.grpo_loss(logprobs=logprobs, old_logprobs=logprobs.detach(), is_weights=weights,
                                       **common)
    (grad,) = torch.autograd.grad(weighted, logprobs)
    assert torch.allclose(grad, plain_grad * torch.tensor([[1.0, 0.5, 2.0]]))
    assert PolicySums(**{k: float(v) for k, v in metrics.items()}, sampler_gap_sum=0.0).record()["is_weight_mean"] == \
        pytest.approx(1.25)


def test_without_weights_the_loss_is_bitwise_the_synchronous_one():
    logprobs = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    norms = grpo.loss_normalizers(mask, None, "token")
    common = dict(logprobs=logprobs, old_logprobs=logprobs, advantages=torch.tensor([0.5, -1.0]), loss_mask=mask,
                  update_mask=None, normalizers=norms, clip_low=0.2, clip_high=0.28, aggregation="token")
    ones = grpo.truncated_is_weights(logprobs, logprobs - 3.0, torch.tensor([False, False]), cap=2.0)
    assert torch.equal(grpo.grpo_loss(**common)[0], grpo.grpo_loss(**common, is_weights=ones)[0])


def test_a_worker_schedule_resizes_the_pool_before_its_steps_and_again_after_a_resume(tmp_path):
    from innerloop.distributed.run.driver import scheduled_pool

    cfg = config("rollout.worker_schedule={2: 3, 4: 2}")
    fleet = FakeFleet(cfg)
    sizes = []
    fleet.on_update = lambda calls: sizes.append(len(fleet.workers))
    Trainer(cfg, tmp_path / "run").train(fleet)
    assert sizes == [1, 1, 3, 3, 2, 2]  # before steps 2 and 4 (0-based), nothing else
    assert scheduled_pool({2: 3, 4: 2}, 3, first=True) == 3  # a resume at step 3 takes step 2's size
    assert scheduled_pool({2: 3, 4: 2}, 3, first=False) is None
    assert scheduled_pool({2: 3}, 1, first=True) is None
