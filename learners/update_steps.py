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

from innerloop.distributed.config import AlgorithmConfig
from innerloop.distributed.records import TrainingSample
from innerloop.learners import grpo
from innerloop.learners.batching import MicroBatch, collate, rank_micro_batches, split_mini_batches
from innerloop.learners.logprobs import entropy_from_logits, token_logprobs
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


def plan(samples: list[TrainingSample], mini_batches: int, rank: int, world_size: int, micro_batch_size: int,
         max_tokens: int | None, pad_id: int) -> list[list[MicroBatch]]:
    """This rank's micro-batches of each mini-batch of the whole batch (collated, on the CPU)."""
    return [[collate(chunk, pad_id) for chunk in rank_micro_batches(part, rank, world_size, micro_batch_size, max_tokens)]
            for part in split_mini_batches(samples, mini_batches)]


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


# ---------------------------------------------------------------- the model's log-probs


def first_predicting_position(loss_mask: Tensor) -> int:
    """The last prompt position of the row whose completion starts first: from there on, logits
    predict tokens that carry loss. (A row without loss tokens gives 0: everything is kept.)"""
    return max(0, int(loss_mask.argmax(dim=1).min()) - 1)


def left_pad(values: Tensor, start: int) -> Tensor:
    """[B, T - start] per-position values back to [B, T], zero before `start` (prompt positions)."""
    return torch.nn.functional.pad(values, (start, 0))


def tail_logprobs(model, batch: MicroBatch, temperature: float) -> tuple[Tensor, Tensor, int]:
    """`model`'s logits from the first predicting position `start` on only, [B, T - start, V] (the LM
    head, the largest matmul of a small model, and the log-softmax passes skip the prompt positions no
    loss is taken at); the log-probs of logits / temperature, left-padded to [B, T]; and `start`."""
    start = first_predicting_position(batch.loss_mask)
    keep = batch.input_ids.shape[1] - start
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep).logits
    return logits, left_pad(token_logprobs(logits, batch.input_ids[:, start:], temperature=temperature), start), start


@torch.no_grad()
def fix_logprobs(model, reference, plan_: list[list[MicroBatch]], temperature: float, device) -> list[list[FixedLogprobs]]:
    """The old (and reference) log-probs of every micro-batch, under the weights before the first step."""
    def fixed(batch: MicroBatch) -> FixedLogprobs:
        batch = batch.to(device)
        ref = None if reference is None else tail_logprobs(reference, batch, temperature)[1]
        return FixedLogprobs(tail_logprobs(model, batch, temperature)[1], ref)

    return [[fixed(batch) for batch in part] for part in plan_]


# ---------------------------------------------------------------- micro-batch losses


def nll_loss(model, batch: MicroBatch, normalizer: float, aggregation: str, temperature: float):
    _, logprobs, _ = tail_logprobs(model, batch, temperature)
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
                temperature: float, fixed: FixedLogprobs | None, timings: dict[str, float]) -> tuple[Tensor, Metrics]:
    """One micro-batch's GRPO loss. `fixed`: the batch's old and reference log-probs (several steps
    per batch); None: one step per batch, old = current detached (ratio 1) and the reference now."""
    logits, logprobs, start = tail_logprobs(model, batch, temperature)
    # Entropy as a metric needs no graph (that would double the logits' memory); as a loss term it does.
    with torch.set_grad_enabled(algo.entropy_coef != 0.0):
        source = logits if algo.entropy_coef != 0.0 else logits.detach()
        entropy = left_pad(entropy_from_logits(source, temperature=temperature), start)
    del logits, source
    old = logprobs.detach() if fixed is None else fixed.old
    ref_logprobs = None if fixed is None else fixed.reference
    if fixed is None and reference is not None:
        started = time.perf_counter()
        with torch.no_grad():
            ref_logprobs = tail_logprobs(reference, batch, temperature)[1]
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
