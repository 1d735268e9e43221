"""The typed, frozen records that cross process boundaries.

question (driver -> rollout worker) -> rollout of trajectories (rollout worker -> driver)
-> training sample (driver -> learner) -> update metrics (learner -> driver).

Each field has one meaning for its whole life: a `reward` is never reused as an advantage.
Sequences are tuples so a record cannot be mutated after it is built.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class Question:
    """One task of the outer loop: a prompt with a verifiable reference answer."""

    question_id: str  # stable across runs: the same seed and source give the same ids
    prompt: str  # the question text; the rollout worker applies the chat template
    answer: str  # reference answer the verifier compares against
    solution: str = ""  # optional worked solution (from the generator or the dataset)
    # A conversational dataset row's prompt, as (role, content) turns; empty: `prompt` is the user turn.
    messages: tuple[tuple[str, str], ...] = ()
    # The row's other columns, as TRL passes them to reward functions (reward.functions).
    columns: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class RewardResult:
    """What a reward function says about one completion."""

    reward: float  # the scalar the advantage is computed from
    correct: bool  # the final answer matches the reference
    formatted: bool  # the completion has the required answer format
    error: str = ""  # non-empty when scoring raised or timed out (reward is then the failure value)
    # reward.functions: each weighted part as (name, value or None where the function skipped the
    # completion, error: non-empty where it failed and took the failure value); empty otherwise.
    components: tuple[tuple[str, float | None, str], ...] = ()


@dataclass(frozen=True)
class Trajectory:
    """One sampled completion for one question, scored right after generation."""

    question_id: str
    prompt_ids: tuple[int, ...]  # [P] chat-templated prompt tokens
    completion_ids: tuple[int, ...]  # [C] generated tokens
    logprobs: tuple[float, ...]  # [C] the sampler's log-prob of each generated token
    finish_reason: str  # "stop" | "length" | ...
    text: str  # decoded completion
    reward: float
    correct: bool
    formatted: bool
    policy_version: int  # the weights version that generated this trajectory
    reward_error: str = ""
    reward_components: tuple[tuple[str, float | None, str], ...] = ()  # RewardResult.components


@dataclass(frozen=True)
class Rollout:
    """What one rollout worker returns for its share of a step's questions."""

    trajectories: tuple[Trajectory, ...]  # G per question, in question order
    engine_seconds: float  # vLLM generation
    score_seconds: float  # the reward function over every completion


@dataclass(frozen=True)
class TrainingSample:
    """One trajectory as the learner sees it: tokens, masks and one advantage.

    The learner is advantage-blind: it never sees rewards or groups.
    """

    input_ids: tuple[int, ...]  # [P + C] prompt then completion
    loss_mask: tuple[int, ...]  # [P + C] 1 on completion tokens that carry loss
    sampler_logprobs: tuple[float, ...]  # [P + C] 0 on prompt positions; the sampler's on completion
    advantage: float  # the same for every token of the trajectory
    update: bool = True  # False: excluded from the policy-gradient term (update subsets)
    staleness: int = 0  # policy versions between the sampler's weights and the learner's (asynchronous)

    @classmethod
    def of_completion(cls, prompt_ids: tuple[int, ...], completion_ids: tuple[int, ...], advantage: float,
                      completion_logprobs: tuple[float, ...] | None = None, update: bool = True,
                      staleness: int = 0) -> "TrainingSample":
        """Loss on the completion only; the sampler's log-probs 0 on the prompt (everywhere without any)."""
        logprobs = (0.0,) * len(completion_ids) if completion_logprobs is None else completion_logprobs
        return cls(prompt_ids + completion_ids, (0,) * len(prompt_ids) + (1,) * len(completion_ids),
                   (0.0,) * len(prompt_ids) + logprobs, advantage, update, staleness)


@dataclass(frozen=True)
class PolicySums:
    """A GRPO update's additive metrics (learners/grpo.py's), summed over micro-batches and then ranks."""

    loss: float  # the loss optimized: each micro-batch's is already divided by a whole-batch normalizer
    policy_loss: float  # the clipped surrogate term
    kl: float  # to the reference policy; 0 without one
    entropy: float
    clipped_tokens: float  # policy tokens where the clip was active
    policy_tokens: float  # loss tokens of the update subset's samples
    tokens: float  # loss tokens trained on
    is_weight_sum: float  # truncated importance weights, over the policy tokens
    sampler_gap_sum: float  # |learner - sampler| log-prob, over the loss tokens
    is_bounded_tokens: float = 0.0  # policy tokens whose importance weight the cap truncated or masked

    def record(self) -> dict[str, float]:
        """The logged names: the sums, with means in place of the two weighted sums, and clip_fraction."""
        out, policy_tokens = asdict(self), max(self.policy_tokens, 1.0)
        out.update(clip_fraction=self.clipped_tokens / policy_tokens,
                   is_weight_mean=out.pop("is_weight_sum") / policy_tokens,
                   is_bounded_fraction=out.pop("is_bounded_tokens") / policy_tokens,
                   sampler_logprob_gap=out.pop("sampler_gap_sum") / max(self.tokens, 1.0))
        return out


@dataclass(frozen=True)
class NllSums:
    """An SFT update's additive metrics, summed over micro-batches and then ranks."""

    loss: float
    nll: float  # the negative log-likelihood of the trajectory tokens: the loss
    tokens: float  # loss tokens trained on

    def record(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class UpdateMetrics:
    """What one learner update reports: a rank's own, or every rank's as one (`over_ranks`).

    `sums` add up over ranks; the other fields are the same on every rank.
    """

    sums: PolicySums | NllSums
    grad_norm: float
    learning_rate: float  # the rate the step used
    update_seconds: float
    skipped: bool  # the step changed no weight: its loss or gradient was not finite
    reference_seconds: float | None = None  # GRPO: the reference model's part of update_seconds

    @staticmethod
    def over_ranks(per_rank: list["UpdateMetrics"]) -> "UpdateMetrics":
        """The ranks' records as one: sums added up, the shared fields rank 0's."""
        first = per_rank[0]
        sums = {f.name: sum(getattr(r.sums, f.name) for r in per_rank) for f in fields(first.sums)}
        return replace(first, sums=type(first.sums)(**sums))

    def record(self) -> dict[str, float]:
        """The logged names (metrics.jsonl); reference_seconds only where there is one (GRPO)."""
        shared = {k: v for k, v in asdict(self).items() if k not in ("sums", "skipped") and v is not None}
        return {**self.sums.record(), **shared, "step_skipped": float(self.skipped)}
