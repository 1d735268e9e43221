"""Trajectories -> training samples: the one place that sees whole groups, so advantages live here."""

from __future__ import annotations

from collections import defaultdict

import torch

from innerloop.distributed.config import AlgorithmConfig
from innerloop.distributed.records import Trajectory, TrainingSample
from innerloop.learners import grpo
from innerloop.learners.batching import collate


def group_by_question(trajectories: list[Trajectory]) -> list[list[Trajectory]]:
    """Groups in first-seen question order; each group is one question's G trajectories."""
    groups: dict[str, list[Trajectory]] = defaultdict(list)
    for trajectory in trajectories:
        groups[trajectory.question_id].append(trajectory)
    return list(groups.values())


def group_advantages(groups: list[list[Trajectory]], algorithm: AlgorithmConfig) -> torch.Tensor:
    """Each trajectory's advantage within its group of G (`algorithm.advantage_scale`): [Q, G]."""
    sizes = {len(g) for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"every group must hold the same number of trajectories, got sizes {sorted(sizes)}")
    rewards = torch.tensor([[t.reward for t in g] for g in groups], dtype=torch.float32)  # [Q, G]
    return grpo.group_advantages(rewards, algorithm.advantage_scale)


def build_samples(groups: list[list[Trajectory]], advantages: torch.Tensor, algorithm: AlgorithmConfig,
                  seed: int = 0, learner_version: int | None = None) -> list[TrainingSample]:
    """One training sample per trajectory, with its advantage ([Q, G], from `group_advantages`), and
    `update` set on the seeded random `algorithm.update_subset` of each group (all G when None).
    `learner_version`: the policy version being updated; older trajectories are marked stale."""
    num_groups, G = advantages.shape
    m = G if algorithm.update_subset is None else algorithm.update_subset
    # Its own generator: the subset depends only on the seed, never on other torch random draws.
    update = grpo.update_subset_mask(num_groups, G, m, torch.Generator().manual_seed(seed))  # [Q * G]
    trajectories = [t for group in groups for t in group]
    return [
        _sample(t, float(a), bool(u), 0 if learner_version is None else learner_version - t.policy_version)
        for t, a, u in zip(trajectories, advantages.reshape(-1).tolist(), update.tolist())
    ]


def _sample(trajectory: Trajectory, advantage: float, update: bool, staleness: int) -> TrainingSample:
    if len(trajectory.logprobs) != len(trajectory.completion_ids):
        raise ValueError(f"trajectory of {trajectory.question_id} has {len(trajectory.logprobs)} log-probs for "
                         f"{len(trajectory.completion_ids)} completion tokens; the rollout worker must return one "
                         "per token")
    return TrainingSample.of_completion(trajectory.prompt_ids, trajectory.completion_ids, advantage,
                                        trajectory.logprobs, update, staleness)


def loss_normalizers(samples: list[TrainingSample], algorithm: AlgorithmConfig) -> grpo.LossNormalizers:
    """Counts over the whole step's batch that every rank divides its loss by."""
    loss_mask = collate(samples, pad_id=0).loss_mask
    update_mask = torch.tensor([s.update for s in samples], dtype=torch.bool)
    return grpo.loss_normalizers(loss_mask, update_mask, algorithm.aggregation,
                                 algorithm.mask_kl_and_entropy_by_update)


def sft_normalizer(samples: list[TrainingSample], aggregation: str) -> float:
    """The SFT loss's divisor over the whole step's batch: its loss tokens or sequences (at least 1).
    Count it under the aggregation the learner uses (`algorithm.aggregation`)."""
    return grpo.global_normalizer(collate(samples, pad_id=0).loss_mask, aggregation)
