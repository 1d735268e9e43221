"""The typed, frozen records that cross process boundaries.

question (driver -> rollout worker) -> rollout of trajectories (rollout worker -> driver)
-> training sample (driver -> learner) -> update metrics (learner -> driver).

Each field has one meaning for its whole life: a `reward` is never reused as an advantage.
Sequences are tuples so a record cannot be mutated after it is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Question:
    """One task of the outer loop: a prompt with a verifiable reference answer."""

    question_id: str  # stable across runs: the same seed and source give the same ids
    prompt: str  # the question text; the rollout worker applies the chat template
    answer: str  # reference answer the verifier compares against
    solution: str = ""  # optional worked solution (from the generator or the dataset)


@dataclass(frozen=True)
class RewardResult:
    """What a reward function says about one completion."""

    reward: float  # the scalar the advantage is computed from
    correct: bool  # the final answer matches the reference
    formatted: bool  # the completion has the required answer format
    error: str = ""  # non-empty when scoring raised or timed out (reward is then the failure value)


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


@dataclass(frozen=True)
class UpdateMetrics:
    """What one learner update reports back to the driver (already reduced across ranks)."""

    loss: float
    policy_loss: float
    kl: float
    entropy: float
    clip_fraction: float
    grad_norm: float
    learning_rate: float
    tokens: int  # loss tokens trained on, all ranks
    seconds: float
    skipped: bool = False  # True when the step was skipped because the loss was not finite
    extra: dict[str, float] = field(default_factory=dict)
