"""GRPO and SFT loss math: pure torch functions over [batch, time] tensors (log-probs: logprobs.py).

No Ray, vLLM, DeepSpeed or transformers here; everything runs on the CPU in milliseconds.

Conventions
- B = samples (trajectories) in this piece of the batch, T = positions, V = vocabulary.
- `logprobs[:, t]` is the log-prob of `input_ids[:, t]` given `input_ids[:, :t]`, so it lines up
  with `input_ids`, `loss_mask` and the sampler's log-probs (`TrainingSample`). Position 0 has no
  prediction and is 0.
- `loss_mask` [B, T] (bool or 0/1) is 1 on completion tokens that carry loss; prompt and padding 0.
- `update_mask` [B] bool marks the update subset: samples that get the policy-gradient term.
- Samples in a batch are group-major: sample `i * G + j` is trajectory j of question i.
- Losses are divided by a *global* normalizer (a count over the whole global batch, all ranks and
  micro-batches), so the pieces of a split batch sum to the full-batch loss and gradient exactly.
- Every metric returned is additive: sum it over micro-batches and ranks (`records.PolicySums`).
  Metrics are detached float64 device scalars, not Python floats, so a micro-batch costs no host
  sync; float64 keeps token counts exact past 2**24.

Deliberate departures from the papers (GRPO: Shao et al. 2024; DAPO: Yu et al. 2025;
Dr.GRPO: Liu et al. 2025; the update subset: Liu et al. 2025, arXiv 2505.19815)
1. Advantage scale "std" uses the sample std (Bessel's correction, as torch.std, verl and TRL
   do) plus eps outside the root. A zero-variance group (including G = 1) gets exactly zero
   advantages: float rounding in `r - mean` would otherwise be divided by a tiny std.
2. Clip-higher (DAPO): the ratio is clipped to [1 - clip_low, 1 + clip_high]; clip_low ==
   clip_high is plain PPO/GRPO. No dual clip (a negative advantage with a huge ratio is not
   bounded from below).
3. The ratio is per token (PPO/GRPO/DAPO), not per sequence (GSPO).
4. Aggregation "token" is DAPO's token-level mean over the whole global batch; "sequence" is
   GRPO's per-sequence mean over its tokens, then a mean over all sequences of the global batch.
   Dr.GRPO divides by a constant (the max generation length); not provided: the closest here is
   scale "none" with aggregation "token" (one normalizer for the whole batch, not per sequence).
   Sequences with no loss tokens are not counted in the "sequence" normalizer, so dummy rows that
   pad a rank's batch change nothing.
5. KL to the reference, as a loss term (GRPO's; DAPO and Dr.GRPO drop it: kl_coef = 0). The
   estimators are chosen for the gradient they give, not their value (see KL_ESTIMATORS): on
   samples of the policy, k2's expected gradient is that of KL(policy || ref), k3's that of the
   forward KL(ref || policy), and k1's is zero (it only adds noise). k3 is e^r - r - 1 with
   r = ref - logp; beyond r = K3_LOG_RATIO_BOUND it continues along its tangent, so exp cannot
   overflow and the gradient never vanishes (a value clamp would zero it exactly where the policy
   is furthest from the reference). r -> -inf needs no bound: e^r goes to 0, the gradient to 1.
   KL is aggregated like the policy term but over its own units (see 6), then weighted by kl_coef.
6. Update subset (2505.19815): advantages over all G, the policy-gradient term only on the m
   samples in `update_mask`. Its normalizer counts only those samples' units, so the per-token step
   size does not shrink with m (an m sweep then compares support-set size, not learning rate).
   KL and entropy cover all samples with their own normalizer unless
   `mask_kl_and_entropy_by_update`.
7. Optional entropy bonus (not in GRPO): loss -= entropy_coef * entropy.
8. Log-probs and entropy are of logits / temperature, to match a sampler that used a temperature.
9. Stale trajectories (asynchronous rollouts) were sampled by an older policy mu. Their
   policy-gradient tokens are weighted by min(pi_old / mu, cap), pi_old the learner's policy at the
   start of the update (detached) and mu the sampler's log-probs: truncated importance sampling
   (Espeholt et al. 2018's truncation, as applied to LLM rollouts by Yao et al. 2025). Fresh
   trajectories get weight 1, so the synchronous trainer's loss is unchanged; the weight is not
   clipped from below. `algorithm.sampler_correction` instead weighs every token, fresh ones too
   (the train-inference mismatch), truncated or masked, per token or per sequence (off_policy.py).
10. Several optimizer steps per batch (`algorithm.mini_batches` x `algorithm.epochs`, PPO's
   epochs and mini-batches): old log-probs and the reference's are computed once, before the
   first step, and advantages stay fixed, so the ratio and the clip act from the second step on.
   Each mini-batch's loss keeps the whole batch's normalizer and its gradient is scaled by the
   number of mini-batches: the mini-batch losses sum to the full-batch loss and every token
   weighs the same in every step (a per-mini-batch mean would weigh tokens of a short mini-batch
   more). With one step per batch old = current (ratio 1), as before.
11. top_p < 1 is refused wherever the sampler's log-probs weigh the loss (asynchronous rollouts,
   `sampler_correction`): vLLM renormalises them over the nucleus, the learner's are over the
   whole vocabulary, so pi / mu would be biased upward on every token, and a same-nucleus
   learner log-prob would need the sampler's exact nucleus per position (a sort of the
   vocabulary at every position; vLLM does not return it). The on-policy loss itself uses the
   full softmax, as verl and TRL do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar

import torch
from torch import Tensor

K3_LOG_RATIO_BOUND = 10.0  # r = ref - logp beyond this: k3 goes on along its tangent (e^10 ~ 2.2e4)

_V = TypeVar("_V")


def _pick(registry: Mapping[str, _V], name: str, what: str) -> _V:
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(registry)}")
    return registry[name]


# ---------------------------------------------------------------- advantages


def _scale_by_std(rewards: Tensor, eps: float) -> Tensor:  # [N, G] -> [N, G]
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    return centered / (rewards.std(dim=1, keepdim=True, correction=1) + eps)


def _no_scale(rewards: Tensor, eps: float) -> Tensor:  # [N, G] -> [N, G]
    return rewards - rewards.mean(dim=1, keepdim=True)


ADVANTAGE_SCALES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "std": _scale_by_std,  # GRPO: (r - mean) / (std + eps)
    "none": _no_scale,  # Dr.GRPO: r - mean
}


def group_advantages(rewards: Tensor, scale: str, eps: float = 1e-6) -> Tensor:
    """Advantages within each group of G trajectories of one question.

    rewards: [num_groups, G]. Returns [num_groups, G] float; zero-variance groups give exact zeros.
    """
    fn = _pick(ADVANTAGE_SCALES, scale, "advantage scale")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, G], got shape {tuple(rewards.shape)}")
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    if rewards.shape[1] < 2:  # one trajectory: nothing to compare against (and no sample std)
        return torch.zeros_like(rewards)
    zero_variance = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)  # [N, 1]
    return torch.where(zero_variance, 0.0, fn(rewards, eps))


def update_subset_mask(num_groups: int, G: int, m: int, generator: torch.Generator) -> Tensor:
    """A seeded random m of the G trajectories of each group: [num_groups * G] bool, group-major."""
    if not 1 <= m <= G:
        raise ValueError(f"update subset size m={m} must be in 1..G={G}")
    order = torch.rand(num_groups, G, generator=generator).argsort(dim=1)  # [N, G] a permutation
    mask = torch.zeros(num_groups, G, dtype=torch.bool)
    mask.scatter_(1, order[:, :m], True)
    return mask.reshape(-1)


# ---------------------------------------------------------------- KL estimators (KL(policy || ref))


def _kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return logprobs - ref_logprobs


def _kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return 0.5 * (logprobs - ref_logprobs) ** 2


def _kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    # e^r - r - 1, and beyond r = B its tangent e^B (1 + r - B) - r - 1: finite, gradient e^B - 1.
    log_ratio = ref_logprobs - logprobs
    bounded = log_ratio.clamp(max=K3_LOG_RATIO_BOUND)
    return torch.exp(bounded) * (1.0 + log_ratio - bounded) - log_ratio - 1.0


# Per-token d/d logp, whose expectation over samples of the policy is what the loss term pulls by:
KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": _kl_k1,  # 1: expected gradient zero (E[grad logp] = 0); unbiased value, noise as a loss
    "k2": _kl_k2,  # logp - ref: the gradient of KL(policy || ref) exactly
    "k3": _kl_k3,  # 1 - ref/policy: the gradient of the forward KL(ref || policy) (GRPO's choice)
}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:  # [B, T] x2 -> [B, T]
    """Per-token estimate of KL(policy || ref) from samples of the policy."""
    return _pick(KL_ESTIMATORS, estimator, "KL estimator")(logprobs, ref_logprobs)


# ---------------------------------------------------------------- surrogate


def clipped_surrogate(
    logprobs: Tensor,  # [B, T] current policy, with grad
    old_logprobs: Tensor,  # [B, T] the policy that sampled (or its recomputation)
    advantages: Tensor,  # [B]
    clip_low: float,
    clip_high: float,
) -> tuple[Tensor, Tensor]:  # per-token loss [B, T], clipped [B, T] bool
    """PPO clip with separate bounds: loss = -min(ratio * A, clip(ratio, 1-clip_low, 1+clip_high) * A).

    `clipped` is True exactly where the clipped branch is strictly smaller (ratio > 1+clip_high with
    A > 0, ratio < 1-clip_low with A < 0); the gradient there is zero.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.to(ratio.dtype).unsqueeze(1)  # [B, 1]
    unclipped = ratio * adv
    bounded = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    clipped = bounded < unclipped
    return -torch.where(clipped, bounded, unclipped), clipped


# ---------------------------------------------------------------- off-policy correction


def truncated_is_weights(
    logprobs: Tensor,  # [B, T] the learner's current policy (detached inside)
    sampler_logprobs: Tensor,  # [B, T] the policy that sampled
    stale: Tensor,  # [B] bool: sampled by an older policy than the learner's
    cap: float,
) -> Tensor:  # [B, T], 1 on rows that are not stale
    """Per-token min(pi / mu, cap) on stale rows (departure 9), 1 elsewhere; no gradient."""
    log_ratio = (logprobs.detach() - sampler_logprobs).clamp(max=math.log(cap))
    return torch.where(stale.bool().unsqueeze(1), torch.exp(log_ratio), torch.ones_like(log_ratio))


# ---------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class Aggregation:
    """How per-token values become one number: a sum over units, divided by a global unit count."""

    total: Callable[[Tensor, Tensor], Tensor]  # (values [B, T], mask [B, T] bool) -> scalar sum over units
    units: Callable[[Tensor], Tensor]  # (mask [B, T] bool) -> scalar count of units


def _token_total(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, values, 0.0).sum()


def _token_units(mask: Tensor) -> Tensor:
    return mask.sum(dtype=torch.float64)


def _sequence_total(values: Tensor, mask: Tensor) -> Tensor:
    per_sequence = torch.where(mask, values, 0.0).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [B]
    return per_sequence.sum()


def _sequence_units(mask: Tensor) -> Tensor:
    return mask.any(dim=1).sum(dtype=torch.float64)  # sequences without loss tokens do not count


AGGREGATIONS: dict[str, Aggregation] = {
    "token": Aggregation(_token_total, _token_units),  # DAPO / Dr.GRPO: every token weighs the same
    "sequence": Aggregation(_sequence_total, _sequence_units),  # GRPO: every sequence weighs the same
}


def count_units(mask: Tensor, aggregation: str) -> float:
    """Units (tokens or sequences) in `mask` [B, T]. Sum this over ranks/micro-batches for a normalizer."""
    return float(_pick(AGGREGATIONS, aggregation, "aggregation").units(mask.bool()))


def global_normalizer(loss_mask_full: Tensor, aggregation: str) -> float:
    """The divisor for `aggregate`: units in the whole global batch's mask [B_all, T], at least 1."""
    return max(count_units(loss_mask_full, aggregation), 1.0)


def aggregate(values: Tensor, mask: Tensor, normalizer: float | Tensor, aggregation: str) -> Tensor:
    """Sum over the units of this piece / the global normalizer. values, mask: [B, T]. -> scalar."""
    agg = _pick(AGGREGATIONS, aggregation, "aggregation")
    if float(normalizer) <= 0:
        raise ValueError(f"normalizer must be a positive global count, got {float(normalizer)}")
    return agg.total(values, mask.bool()) / normalizer


@dataclass(frozen=True)
class LossNormalizers:
    """Global unit counts for `grpo_loss`, with the settings they were counted under."""

    aggregation: str
    mask_kl_and_entropy_by_update: bool
    policy: float  # units of update-subset samples (policy-gradient term), whole global batch
    regularizer: float  # units carrying KL and entropy, whole global batch

    def check(self, aggregation: str, mask_kl_and_entropy_by_update: bool) -> None:
        if (self.aggregation, self.mask_kl_and_entropy_by_update) != (aggregation, mask_kl_and_entropy_by_update):
            raise ValueError(
                f"normalizers were counted for aggregation={self.aggregation!r}, mask_kl_and_entropy_by_update="
                f"{self.mask_kl_and_entropy_by_update}; the loss asks for {aggregation!r}, "
                f"{mask_kl_and_entropy_by_update}: build them with loss_normalizers(...) and the same settings"
            )


def _policy_mask(loss_mask: Tensor, update_mask: Tensor | None) -> Tensor:  # -> [B, T] bool
    loss_mask = loss_mask.bool()
    return loss_mask if update_mask is None else loss_mask & update_mask.bool().unsqueeze(1)


def loss_normalizers(
    loss_mask_full: Tensor,  # [B_all, T] the whole global batch
    update_mask_full: Tensor | None,  # [B_all] bool; None: every sample is updated
    aggregation: str,
    mask_kl_and_entropy_by_update: bool = False,
) -> LossNormalizers:
    """Normalizers from the whole global batch. With only shards at hand, sum `count_units` of
    `loss_mask & update_mask[:, None]` (policy) and of the regularizer mask over ranks, clamp at 1."""
    policy_mask = _policy_mask(loss_mask_full, update_mask_full)
    regularizer_mask = policy_mask if mask_kl_and_entropy_by_update else loss_mask_full
    return LossNormalizers(
        aggregation=aggregation,
        mask_kl_and_entropy_by_update=mask_kl_and_entropy_by_update,
        policy=global_normalizer(policy_mask, aggregation),
        regularizer=global_normalizer(regularizer_mask, aggregation),
    )


# ---------------------------------------------------------------- losses


def grpo_loss(
    logprobs: Tensor,  # [B, T] current policy, with grad
    old_logprobs: Tensor,  # [B, T] behaviour policy; any value on positions outside loss_mask
    advantages: Tensor,  # [B] one number per sample
    loss_mask: Tensor,  # [B, T] bool or 0/1
    update_mask: Tensor | None,  # [B] bool: the update subset; None = all samples
    normalizers: LossNormalizers,
    *,
    clip_low: float,
    clip_high: float,
    aggregation: str,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    ref_logprobs: Tensor | None = None,  # [B, T] reference policy; required when kl_coef != 0
    entropy: Tensor | None = None,  # [B, T] from entropy_from_logits; required when entropy_coef != 0
    entropy_coef: float = 0.0,
    mask_kl_and_entropy_by_update: bool = False,
    is_weights: Tensor | None = None,  # [B, T] from truncated_is_weights; None: all 1
) -> tuple[Tensor, dict[str, Tensor]]:
    """loss = policy_loss + kl_coef * kl - entropy_coef * entropy, each aggregated over this piece
    and divided by the global normalizers. Metrics are detached float64 scalars, all additive."""
    normalizers.check(aggregation, mask_kl_and_entropy_by_update)
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy")
    loss_mask = loss_mask.bool()
    policy_mask = _policy_mask(loss_mask, update_mask)
    regularizer_mask = policy_mask if mask_kl_and_entropy_by_update else loss_mask

    # Outside the mask old log-probs are arbitrary (0 on the prompt); a ratio of exactly 1 there keeps
    # exp() finite, so a masked-out inf cannot turn into a NaN gradient.
    safe_old = torch.where(policy_mask, old_logprobs, logprobs.detach())
    per_token, clipped = clipped_surrogate(logprobs, safe_old, advantages, clip_low, clip_high)
    weights = torch.ones_like(per_token) if is_weights is None else torch.where(policy_mask, is_weights, 1.0)
    policy_loss = aggregate(per_token * weights, policy_mask, normalizers.policy, aggregation)

    kl = mean_entropy = logprobs.new_zeros(())
    if ref_logprobs is not None:
        safe_ref = torch.where(regularizer_mask, ref_logprobs, logprobs.detach())
        per_token_kl = kl_penalty(logprobs, safe_ref, kl_estimator)
        kl = aggregate(per_token_kl, regularizer_mask, normalizers.regularizer, aggregation)
    if entropy is not None:
        mean_entropy = aggregate(entropy, regularizer_mask, normalizers.regularizer, aggregation)

    loss = policy_loss + kl_coef * kl - entropy_coef * mean_entropy
    metrics = {
        "loss": loss,
        "policy_loss": policy_loss,
        "kl": kl,
        "entropy": mean_entropy,
        "clipped_tokens": (clipped & policy_mask).sum(),
        "policy_tokens": policy_mask.sum(),
        "tokens": loss_mask.sum(),
        "is_weight_sum": torch.where(policy_mask, weights, 0.0).sum(),  # / policy_tokens: the mean weight
    }
    return loss, _detach(metrics)


def sft_nll_loss(
    logprobs: Tensor,  # [B, T] with grad
    loss_mask: Tensor,  # [B, T] bool or 0/1: trajectory tokens to imitate
    normalizer: float | Tensor,  # global_normalizer(loss_mask of the whole global batch, aggregation)
    aggregation: str,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Negative log-likelihood of the trajectory tokens; metrics additive as in `grpo_loss`."""
    loss = aggregate(-logprobs, loss_mask, normalizer, aggregation)
    return loss, _detach({"loss": loss, "nll": loss, "tokens": loss_mask.bool().sum()})


# ---------------------------------------------------------------- metrics


def _detach(metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    # Device scalars, no host sync per micro-batch; float64 keeps token counts exact past 2**24.
    return {k: v.detach().to(torch.float64) for k, v in metrics.items()}


def sum_metrics(pieces: list[Mapping[str, Tensor | float]]) -> dict[str, Tensor | float]:
    """Sum the metrics of micro-batches (or ranks); every metric here is additive."""
    keys = set(pieces[0])
    if any(set(p) != keys for p in pieces):
        raise ValueError("metric pieces have different keys; they came from different losses")
    return {k: sum(p[k] for p in pieces) for k in sorted(keys)}
