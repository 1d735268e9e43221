"""One learner update, DeepSpeed-free: a batch's optimizer steps, each over this rank's micro-batches.

learner.py hands in its DeepSpeed engine; tests hand in a plain-torch stand-in with the same calls
(`set_train_batch_size`, `set_gradient_accumulation_boundary`, `backward`, `step`, `get_lr`,
`get_global_grad_norm`, `was_step_applied`, `train`, `device`, and a forward). The micro-batch
losses here are the GRPO and SFT losses of learners/grpo.py on the model's tail log-probs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from innerloop.distributed.config import AlgorithmConfig, LearnerConfig
from innerloop.distributed.records import TrainingSample
from innerloop.learners import grpo
from innerloop.learners.batching import MicroBatch, collate, rank_micro_batches, split_mini_batches
from innerloop.learners.forward import forward
from innerloop.learners.logprobs import entropy_from_logits
from innerloop.learners.off_policy import sampler_correction_weights

Metrics = dict[str, Tensor]


@dataclass(frozen=True)
class FixedLogprobs:
    """What a batch fixes for one micro-batch before its first optimizer step (grpo.py, departure 10)."""

    old: Tensor  # [B, T] the learner's log-probs at the start of the update
    reference: Tensor | None  # [B, T] the KL reference's; None without a KL term


@dataclass(frozen=True)
class StepResult:
    metrics: Metrics  # the step's additive metrics, summed over its micro-batches
    grad_norm: float
    learning_rate: float  # the rate the step used
    applied: bool  # False: DeepSpeed skipped it (a non-finite gradient)


MicroBatchLoss = Callable[[int, MicroBatch], tuple[Tensor, Metrics]]  # (index in the step, batch)


def plan(samples: list[TrainingSample], mini_batches: int, rank: int, world_size: int, cfg: LearnerConfig,
         pad_id: int) -> list[list[MicroBatch]]:
    """This rank's micro-batches of each mini-batch of the whole batch (collated, on the CPU)."""
    def micro(part: list[TrainingSample]) -> list[MicroBatch]:
        chunks = rank_micro_batches(part, rank, world_size, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch,
                                    cfg.packing)
        return [collate(chunk, pad_id) for chunk in chunks]

    return [micro(part) for part in split_mini_batches(samples, mini_batches)]


def optimizer_step(engine, chunks: list[MicroBatch], micro_batch_loss: MicroBatchLoss, *, world_size: int,
                   nominal_micro_batch: int, gradient_scale: float = 1.0) -> StepResult:
    """Forward and backward every micro-batch of this rank's part of one mini-batch, then one optimizer
    step. `micro_batch_loss` returns a loss already divided by a whole-batch normalizer; its gradient
    is multiplied by `gradient_scale` (the batch's mini-batch count, departure 10)."""
    engine.set_train_batch_size(len(chunks) * nominal_micro_batch * world_size)
    # DeepSpeed divides each micro-batch loss by the accumulation steps and averages gradients
    # over ranks; the global normalizers already account for both, so undo them.
    undo_averaging = len(chunks) * world_size * gradient_scale
    pieces, finite = [], True
    learning_rate = float(engine.get_lr()[0])  # the rate this step uses, before the schedule moves
    engine.train()
    for index, chunk in enumerate(chunks):
        # The optimizer steps after this step's last micro-batch. DeepSpeed's own boundary counts
        # micro-steps across calls, so a batch of another size (an SFT step) would shift it.
        engine.set_gradient_accumulation_boundary(index == len(chunks) - 1)
        loss, metrics = micro_batch_loss(index, chunk.to(engine.device))
        finite = finite and bool(torch.isfinite(loss))
        # A non-finite loss is still backpropagated: every rank must take part in the gradient
        # reduction, and DeepSpeed's overflow check then skips the step on all ranks together.
        engine.backward(loss * undo_averaging)
        engine.step()
        pieces.append(metrics)
    grad_norm = float(engine.get_global_grad_norm() or 0.0)
    applied = bool(engine.was_step_applied())
    if applied and not (finite and math.isfinite(grad_norm)):
        raise FloatingPointError(
            "a non-finite loss or gradient reached the weights (this ZeRO stage has no overflow check); use "
            "learner.zero_stage=1 or 2, which skip such steps, and resume from the last checkpoint")
    return StepResult(grpo.sum_metrics(pieces), grad_norm, learning_rate, applied)


def combine(steps: list[StepResult], epochs: int) -> tuple[dict[str, float], float]:
    """An update's metric sums and mean gradient norm. Each epoch's steps cover the batch once, so
    their sums are the batch's; over several epochs, the mean epoch."""
    total = grpo.sum_metrics([s.metrics for s in steps])
    sums = {k: float(v) if epochs == 1 else float(v) / epochs for k, v in total.items()}
    return sums, sum(s.grad_norm for s in steps) / len(steps)


# ---------------------------------------------------------------- fixed per batch


@torch.no_grad()
def fix_logprobs(model, reference, plan_: list[list[MicroBatch]], temperature: float, device,
                 packed: bool = False) -> list[list[FixedLogprobs]]:
    """The old (and reference) log-probs of every micro-batch, under the weights before the first step."""
    def fixed(batch: MicroBatch) -> FixedLogprobs:
        batch = batch.to(device)
        ref = None if reference is None else forward(reference, batch, temperature, packed).logprobs
        return FixedLogprobs(forward(model, batch, temperature, packed).logprobs, ref)

    return [[fixed(batch) for batch in part] for part in plan_]


# ---------------------------------------------------------------- micro-batch losses


def nll_loss(model, batch: MicroBatch, normalizer: float, aggregation: str, temperature: float, packed: bool = False):
    logprobs = forward(model, batch, temperature, packed).logprobs
    return grpo.sft_nll_loss(logprobs, batch.loss_mask, normalizer, aggregation)


def importance_weights(old: Tensor, batch: MicroBatch, algo: AlgorithmConfig) -> tuple[Tensor | None, Tensor]:
    """The sampler -> learner weights of `algo.sampler_correction` (None: all 1) and where the cap bounded them."""
    if algo.sampler_correction != "stale_only":
        return sampler_correction_weights(old, batch.sampler_logprobs, batch.loss_mask, algo.sampler_correction,
                                          algo.tis_cap)
    over_cap = (old - batch.sampler_logprobs > math.log(algo.tis_cap)) & batch.stale.unsqueeze(1)
    if not bool(batch.stale.any()):
        return None, over_cap
    return grpo.truncated_is_weights(old, batch.sampler_logprobs, batch.stale, algo.tis_cap), over_cap


def policy_loss(model, reference, batch: MicroBatch, normalizers: grpo.LossNormalizers, algo: AlgorithmConfig,
                temperature: float, fixed: FixedLogprobs | None, timings: dict[str, float],
                packed: bool = False) -> tuple[Tensor, Metrics]:
    """One micro-batch's GRPO loss. `fixed`: the batch's old and reference log-probs (several steps
    per batch); None: one step per batch, old = current detached (ratio 1) and the reference now."""
    out = forward(model, batch, temperature, packed)
    logprobs = out.logprobs
    # Entropy as a metric needs no graph (that would double the logits' memory); as a loss term it does.
    with torch.set_grad_enabled(algo.entropy_coef != 0.0):
        source = out.logits if algo.entropy_coef != 0.0 else out.logits.detach()
        entropy = out.to_positions(entropy_from_logits(source, temperature=temperature))
    del out, source
    old = logprobs.detach() if fixed is None else fixed.old
    ref_logprobs = None if fixed is None else fixed.reference
    if fixed is None and reference is not None:
        started = time.perf_counter()
        with torch.no_grad():
            ref_logprobs = forward(reference, batch, temperature, packed).logprobs
        timings["reference"] = timings.get("reference", 0.0) + time.perf_counter() - started
    is_weights, bounded = importance_weights(old, batch, algo)
    loss, metrics = grpo.grpo_loss(
        logprobs=logprobs, old_logprobs=old, advantages=batch.advantages,
        loss_mask=batch.loss_mask, update_mask=batch.update_mask, normalizers=normalizers,
        clip_low=algo.clip_low, clip_high=algo.clip_high, aggregation=algo.aggregation,
        kl_coef=algo.kl_coef, kl_estimator=algo.kl_estimator, ref_logprobs=ref_logprobs,
        entropy=entropy, entropy_coef=algo.entropy_coef,
        mask_kl_and_entropy_by_update=algo.mask_kl_and_entropy_by_update, is_weights=is_weights)
    mask = batch.loss_mask.bool()
    policy_mask = mask & batch.update_mask.unsqueeze(1)
    metrics["is_bounded_tokens"] = (bounded & policy_mask).sum().double()
    # How far the rollout engine's log-probs are from the learner's (weight-sync and numerics check).
    metrics["sampler_gap_sum"] = (logprobs.detach() - batch.sampler_logprobs).abs()[mask].sum().double()
    return loss, metrics
