"""Training samples -> padded tensors, split into the micro-batches one rank runs.

Pure torch: the DeepSpeed learner calls these, the tests call them directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from innerloop.distributed.records import TrainingSample


@dataclass(frozen=True)
class MicroBatch:
    input_ids: torch.Tensor  # [B, T] long, right-padded with pad_id
    attention_mask: torch.Tensor  # [B, T] long, 1 on real tokens
    loss_mask: torch.Tensor  # [B, T] float, 1 on completion tokens that carry loss
    sampler_logprobs: torch.Tensor  # [B, T] float, the rollout engine's log-probs (0 on prompt)
    advantages: torch.Tensor  # [B] float
    update_mask: torch.Tensor  # [B] bool, False: no policy-gradient term
    stale: torch.Tensor  # [B] bool, sampled by an older policy than the learner's (importance-weighted)

    def to(self, device: torch.device | str) -> "MicroBatch":
        """The same batch on `device` (the learner's GPU); a no-op where it already is."""
        return MicroBatch(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})


def collate(samples: list[TrainingSample], pad_id: int) -> MicroBatch:
    """Right-pad to the longest sample in this micro-batch (not the whole batch: less waste)."""
    width = max(len(s.input_ids) for s in samples)

    def padded(rows, fill, dtype):
        out = torch.full((len(rows), width), fill, dtype=dtype)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=dtype)
        return out

    return MicroBatch(
        input_ids=padded([s.input_ids for s in samples], pad_id, torch.long),
        attention_mask=padded([[1] * len(s.input_ids) for s in samples], 0, torch.long),
        loss_mask=padded([s.loss_mask for s in samples], 0, torch.float32),
        sampler_logprobs=padded([s.sampler_logprobs for s in samples], 0.0, torch.float32),
        advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float32),
        update_mask=torch.tensor([s.update for s in samples], dtype=torch.bool),
        stale=torch.tensor([s.staleness > 0 for s in samples], dtype=torch.bool),
    )


def shard_for_rank(samples: list[TrainingSample], rank: int, world_size: int) -> list[TrainingSample]:
    """Every rank gets the same count (the config guarantees divisibility).

    Samples are sorted by length first and dealt round-robin, so ranks get similar token counts and
    each micro-batch holds similar lengths (little padding).
    """
    ordered = sorted(samples, key=lambda s: len(s.input_ids))
    return ordered[rank::world_size]


def micro_batches(samples: list[TrainingSample], size: int) -> list[list[TrainingSample]]:
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def token_budget_micro_batches(samples: list[TrainingSample], max_tokens: int,
                               packed: bool = False) -> list[list[TrainingSample]]:
    """Consecutive samples (length-sorted: `shard_for_rank`'s order) while the tokens a micro-batch
    costs stay within `max_tokens`: rows x longest row when padded, the sum of lengths when packed
    (learners/forward.py). A longer sample goes alone."""
    def cost(chunk: list[TrainingSample]) -> int:
        lengths = [len(s.input_ids) for s in chunk]
        return sum(lengths) if packed else len(lengths) * max(lengths)

    chunks: list[list[TrainingSample]] = []
    for sample in samples:
        if chunks and cost(chunks[-1] + [sample]) <= max_tokens:
            chunks[-1].append(sample)
        else:
            chunks.append([sample])
    return chunks


def split_to_count(chunks: list[list[TrainingSample]], count: int) -> list[list[TrainingSample]]:
    """`chunks` cut into exactly `count` micro-batches, halving the one with the most samples each
    time (every rank must run as many micro-batches as the others: DeepSpeed's gradient reduction
    runs once per backward on every rank). Needs at least `count` samples in all."""
    chunks = [list(c) for c in chunks]
    if sum(len(c) for c in chunks) < count:
        raise ValueError(f"{sum(len(c) for c in chunks)} samples cannot fill {count} micro-batches")
    while len(chunks) < count:
        widest = max(range(len(chunks)), key=lambda i: len(chunks[i]))
        chunk = chunks.pop(widest)
        chunks[widest:widest] = [chunk[: len(chunk) // 2], chunk[len(chunk) // 2 :]]
    return chunks


def rank_micro_batches(samples: list[TrainingSample], rank: int, world_size: int, micro_batch_size: int,
                       max_tokens: int | None, packed: bool = False) -> list[list[TrainingSample]]:
    """This rank's micro-batches of `samples` (the whole batch, as every rank sees it): fixed
    `micro_batch_size` samples each, or under a token budget as many as fit, every rank running the
    same number of micro-batches."""
    if max_tokens is None:
        return micro_batches(shard_for_rank(samples, rank, world_size), micro_batch_size)
    per_rank = [token_budget_micro_batches(shard_for_rank(samples, r, world_size), max_tokens, packed)
                for r in range(world_size)]
    return split_to_count(per_rank[rank], max(len(chunks) for chunks in per_rank))


def split_mini_batches(samples: list[TrainingSample], count: int) -> list[list[TrainingSample]]:
    """The batch in `count` consecutive equal parts, one optimizer step each. The batch is group-major
    in the stream's random question order, so a part holds whole questions where count divides them."""
    if count < 1 or len(samples) % count:
        raise ValueError(f"{len(samples)} samples cannot be cut into {count} equal mini-batches")
    size = len(samples) // count
    return [samples[i : i + size] for i in range(0, len(samples), size)]
