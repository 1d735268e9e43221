"""Importance weights from the sampler to the learner, on every token: pure torch (grpo.py departure 9).

The rollout engine's log-probs mu differ from the learner's pi_old even on the same weights (other
kernels, bf16, a batch-dependent reduction order): the train-inference mismatch. A correction weighs
each policy-gradient token by rho = pi_old / mu, bounded by `cap` one of two ways, at one of two
granularities (the modes TRL calls vllm_importance_sampling_mode):
- token_truncate: rho_t = min(pi_old_t / mu_t, cap), per token.
- token_mask: rho_t as it is, but 0 where it exceeds cap (the token gets no policy gradient).
- sequence_truncate: one rho for the whole trajectory, min(prod_t pi_old_t / mu_t, cap), on all its tokens.
- sequence_mask: the sequence's rho, or 0 for the whole trajectory where it exceeds cap.
None is bounded from below. pi_old is detached: the weights carry no gradient.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

# (log rho [B, T] on the loss tokens, 0 elsewhere; loss mask [B, T] bool; log cap) ->
# (weights [B, T], bounded [B, T] bool: where the cap truncated or masked the weight)
Correction = Callable[[Tensor, Tensor, float], tuple[Tensor, Tensor]]


def _token_truncate(log_rho: Tensor, mask: Tensor, log_cap: float) -> tuple[Tensor, Tensor]:
    return torch.exp(log_rho.clamp(max=log_cap)), (log_rho > log_cap) & mask


def _token_mask(log_rho: Tensor, mask: Tensor, log_cap: float) -> tuple[Tensor, Tensor]:
    over = log_rho > log_cap
    return torch.where(over, 0.0, torch.exp(log_rho.clamp(max=log_cap))), over & mask


def _per_sequence(log_rho: Tensor, mask: Tensor) -> Tensor:  # [B, T] -> [B, 1]: log prod_t rho_t
    return torch.where(mask, log_rho, 0.0).sum(dim=1, keepdim=True)


def _sequence_truncate(log_rho: Tensor, mask: Tensor, log_cap: float) -> tuple[Tensor, Tensor]:
    weights, over = _token_truncate(_per_sequence(log_rho, mask), mask.any(dim=1, keepdim=True), log_cap)
    return weights.expand_as(log_rho), over & mask


def _sequence_mask(log_rho: Tensor, mask: Tensor, log_cap: float) -> tuple[Tensor, Tensor]:
    weights, over = _token_mask(_per_sequence(log_rho, mask), mask.any(dim=1, keepdim=True), log_cap)
    return weights.expand_as(log_rho), over & mask


CORRECTIONS: dict[str, Correction] = {
    "token_truncate": _token_truncate,
    "token_mask": _token_mask,
    "sequence_truncate": _sequence_truncate,
    "sequence_mask": _sequence_mask,
}


def sampler_correction_weights(
    old_logprobs: Tensor,  # [B, T] the learner's policy at the start of the update
    sampler_logprobs: Tensor,  # [B, T] the rollout engine's
    loss_mask: Tensor,  # [B, T] bool or 0/1: the tokens the weights apply to
    mode: str,
    cap: float,
) -> tuple[Tensor, Tensor]:  # weights [B, T] (1 outside the mask), bounded [B, T] bool
    """Every loss token's importance weight pi_old / mu under `mode`, and where `cap` bounded it."""
    if mode not in CORRECTIONS:
        raise ValueError(f"unknown sampler correction {mode!r}; choose one of {sorted(CORRECTIONS)}")
    if cap <= 0:
        raise ValueError(f"the importance-weight cap must be positive, got {cap}")
    mask = loss_mask.bool()
    log_rho = torch.where(mask, old_logprobs.detach() - sampler_logprobs, 0.0)
    weights, bounded = CORRECTIONS[mode](log_rho, mask, math.log(cap))
    return torch.where(mask, weights, 1.0), bounded
