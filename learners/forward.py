"""The model's forward for a micro-batch: logits only where loss is taken, log-probs back in [B, T].

Two layouts of the same samples (`MicroBatch` is always the padded one; the loss never sees which):
- padded: [B, T] rows, right-padded; logits from the first predicting position on (`start`).
- packed (`learner.packing`): the real tokens of every row end to end in one row [1, L], each
  sample's positions restarting at 0, no attention mask. transformers then builds a block-diagonal
  causal mask from the position ids, so no token attends across samples, and no pad token is
  computed. Logits are kept only at the positions that predict a loss token (`logits_to_keep`
  with indices), so the LM head skips every prompt position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from innerloop.learners.batching import MicroBatch
from innerloop.learners.logprobs import token_logprobs


@dataclass(frozen=True)
class Forward:
    logits: Tensor  # [b, rows, V]: the rows that predict loss tokens (and what lies between them)
    logprobs: Tensor  # [B, T] of logits / temperature, aligned with the batch; 0 where nothing is predicted
    to_positions: Callable[[Tensor], Tensor]  # per-logit-row values [b, rows] -> [B, T], like `logprobs`


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


def forward(model, batch: MicroBatch, temperature: float, packed: bool = False) -> Forward:
    if not packed:
        logits, logprobs, start = tail_logprobs(model, batch, temperature)
        return Forward(logits, logprobs, lambda values: left_pad(values, start))
    return _packed_forward(model, batch, temperature)


def _packed_forward(model, batch: MicroBatch, temperature: float) -> Forward:
    real, loss = batch.attention_mask.bool(), batch.loss_mask.bool()
    if bool((loss & ~real).any()) or bool(loss[:, 0].any()):
        raise ValueError("a loss token outside a sample, or at its first position (nothing predicts it)")
    ids = batch.input_ids[real].unsqueeze(0)  # [1, L], row after row
    positions = (real.long().cumsum(dim=1) - 1)[real].unsqueeze(0)  # [1, L], from 0 in every sample
    predicting = torch.nonzero(loss[real]).squeeze(1) - 1  # [K] packed positions whose logits predict a loss token
    # One row more: token_logprobs reads row k - 1 for position k, so K predictions need K + 1 rows.
    keep = torch.cat([predicting, predicting.new_tensor([ids.shape[1] - 1])])
    logits = model(input_ids=ids, position_ids=positions, logits_to_keep=keep, use_cache=False).logits  # [1, K+1, V]
    targets = torch.cat([ids[0, :1], ids[0, predicting + 1]]).unsqueeze(0)  # [1, K+1]: target k follows row k - 1

    def to_positions(values: Tensor) -> Tensor:  # [1, K+1] -> [B, T], at the loss tokens
        return torch.zeros(loss.shape, dtype=values.dtype, device=values.device).masked_scatter(loss, values[0, 1:])

    return Forward(logits, to_positions(token_logprobs(logits, targets, temperature=temperature)), to_positions)
