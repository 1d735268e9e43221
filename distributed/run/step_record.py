"""A step's line in metrics.jsonl from typed parts (rollout, update, phase times); `record()` is the
logging edge, the one place they become the dict of logged names."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

from innerloop.distributed.records import Trajectory, UpdateMetrics


class PhaseTimer:
    """Wall time of each named phase of one step; what no phase covers is reported as `other`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._started = time.perf_counter()

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        yield
        self.seconds[phase] = time.perf_counter() - t0

    def record(self) -> dict[str, float]:
        total = time.perf_counter() - self._started
        return {**{f"time_{k}": v for k, v in self.seconds.items()}, "time_step": total,
                "time_other": total - sum(self.seconds.values())}


@dataclass(frozen=True)
class RolloutSummary:
    """A GRPO step's rollout: its groups, and what generating and scoring them took."""

    groups: list[list[Trajectory]]
    generate_seconds: float  # waiting for the generation (the generate phase)
    score_seconds: float  # the slowest worker's reward scoring
    learner_version: int  # the policy version trained on them: staleness is counted against it

    def record(self) -> dict[str, float]:
        trajectories = [t for group in self.groups for t in group]
        n, tokens = max(1, len(trajectories)), sum(len(t.completion_ids) for t in trajectories)
        zero_variance = sum(len({t.reward for t in group}) == 1 for group in self.groups)
        staleness = [self.learner_version - t.policy_version for t in trajectories]
        return {
            "reward_mean": sum(t.reward for t in trajectories) / n,
            "accuracy": sum(t.correct for t in trajectories) / n,
            "formatted": sum(t.formatted for t in trajectories) / n,
            "completion_tokens_mean": tokens / n,
            "truncated": sum(t.finish_reason == "length" for t in trajectories) / n,
            "zero_variance_groups": zero_variance / max(1, len(self.groups)),
            "reward_errors": sum(bool(t.reward_error) for t in trajectories),
            "generated_tokens": tokens,
            "generate_tokens_per_s": tokens / max(self.generate_seconds, 1e-9),
            "time_score": self.score_seconds,
            "staleness_mean": sum(staleness) / n,
            "staleness_max": max(staleness, default=0),
            **reward_components(trajectories),
        }


@dataclass(frozen=True)
class StepRecord:
    """One step of either stage: its update, its phase times, the policy version it ends with, and
    what the stage adds (GRPO: its rollout; SFT: its batch size)."""

    update: UpdateMetrics
    times: dict[str, float]  # PhaseTimer.record()
    policy_version: int
    rollout: RolloutSummary | None = None  # GRPO
    sft_samples: int = 0  # SFT

    def record(self) -> dict:
        rollout = self.rollout
        stage = {"stage": "grpo", **rollout.record()} if rollout else {"stage": "sft", "sft_samples": self.sft_samples}
        return {**stage, **self.update.record(), **self.times, "policy_version": self.policy_version}


def reward_components(trajectories: list[Trajectory]) -> dict[str, float]:
    """reward.functions' parts: reward/NAME, the mean over the completions it scored (a None from a
    TRL-style function leaves one out, as TRL does), and reward/NAME_failed, how many took the
    failure reward."""
    values: dict[str, list[float]] = {}
    failed: dict[str, int] = {}
    for trajectory in trajectories:
        for name, value, error in trajectory.reward_components:
            values.setdefault(name, [])
            failed[name] = failed.get(name, 0) + bool(error)
            if value is not None:
                values[name].append(value)
    out: dict[str, float] = {}
    for name, scored in values.items():
        if scored:  # every completion skipped: no mean to log
            out[f"reward/{name}"] = sum(scored) / len(scored)
        out[f"reward/{name}_failed"] = failed[name]
    return out
