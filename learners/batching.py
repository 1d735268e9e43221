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
