"""Streamed weight sync: the wire that the learner and the rollout engines agree on, in torch alone.

Learner rank 0 sends its parameters in buckets of bounded size over one process group that every
engine process of the rollout pool joins (rank 0 the learner, then each engine's processes from its
rank offset on), so one broadcast reaches every engine. Only the metadata (`WireMeta`) travels as a
message; both ends cut the same buckets from it (`plan_buckets`), and the bytes go by broadcast.
The learner side (learners/weight_stream.py) and the engine side (actors/weight_transfer.py) both
import this module, so neither imports the other's framework: no vLLM on the learner, no DeepSpeed
in the engine. No Ray here either.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

ALIGN = 16  # each tensor starts at a multiple of this many bytes in its bucket, so it views in place


@dataclass(frozen=True)
class TensorMeta:
    name: str  # the Hugging Face checkpoint name: vLLM's `load_weights` maps it onto its fused layers
    dtype: str  # torch dtype name without the prefix, e.g. "bfloat16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * getattr(torch, self.dtype).itemsize

    @property
    def span(self) -> int:
        """Bytes it takes in a bucket: its own, padded to the next tensor's aligned start."""
        return -(-self.nbytes // ALIGN) * ALIGN

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> "TensorMeta":
        return cls(name, str(dtype or tensor.dtype).removeprefix("torch."), tuple(tensor.shape))


@dataclass(frozen=True)
class WireMeta:
    """Every tensor of one sync, in sending order (the same order on every learner rank)."""

    tensors: tuple[TensorMeta, ...]

    def update_info(self) -> dict:
        """The JSON-like form vLLM's `update_weights` call carries to the engine's processes."""
        return {"names": [t.name for t in self.tensors], "dtype_names": [t.dtype for t in self.tensors],
                "shapes": [list(t.shape) for t in self.tensors]}

    @classmethod
    def from_update_info(cls, names: Sequence[str], dtype_names: Sequence[str],
                         shapes: Sequence[Sequence[int]]) -> "WireMeta":
        return cls(tuple(TensorMeta(n, d, tuple(s)) for n, d, s in zip(names, dtype_names, shapes, strict=True)))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @classmethod
    def of_parameters(cls, named: Iterable[tuple[str, torch.nn.Parameter]], dtype: torch.dtype) -> "WireMeta":
        """Sent in `dtype`; a ZeRO-3 partitioned parameter by its full shape (`ds_shape`)."""
        return cls(tuple(TensorMeta(name, str(dtype).removeprefix("torch."),
                                    tuple(getattr(param, "ds_shape", param.shape))) for name, param in named))


@dataclass(frozen=True)
class GroupAddress:
    """Where the transfer group meets: learner rank 0 hosts the store at host:port."""

    host: str
    port: int
    world_size: int  # 1 (the learner) + every engine process of the pool
    bucket_bytes: int  # the most bytes one broadcast carries (a larger tensor goes alone)
    timeout_s: float  # how long any member waits for one bucket before the transfer fails
    backend: str = "gloo"  # torch's process-group backend: gloo on CPUs, nccl on CUDA

    def init_info(self, rank_offset: int) -> dict:
        """What an engine's `init_weight_transfer_engine` receives; its processes take ranks
        rank_offset, rank_offset + 1, ... (one per tensor-parallel shard)."""
        return {"host": self.host, "port": self.port, "world_size": self.world_size,
                "bucket_bytes": self.bucket_bytes, "timeout_s": self.timeout_s, "backend": self.backend,
                "rank_offset": rank_offset}


def plan_buckets(sizes: Sequence[int], limit: int) -> list[range]:
    """Consecutive tensors (by index) in buckets of at most `limit` bytes; a tensor larger than
    `limit` is a bucket of its own (it is sent as it is, never copied)."""
    buckets, start, total = [], 0, 0
    for index, size in enumerate(sizes):
        if index > start and total + size > limit:
            buckets.append(range(start, index))
            start, total = index, 0
        total += size
    if start < len(sizes):
        buckets.append(range(start, len(sizes)))
    return buckets


def bucket_nbytes(metas: Sequence[TensorMeta]) -> int:
    """The bytes one broadcast carries: every tensor at its aligned start, no padding after the last."""
    return sum(m.span for m in metas[:-1]) + metas[-1].nbytes


def unpack(buffer: torch.Tensor, metas: Sequence[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) views into one received bucket; the caller keeps `buffer` alive (a fresh one
    per bucket: vLLM's layerwise reload holds the tensors until their layer is complete)."""
    out, offset = [], 0
    for meta in metas:
        piece = buffer[offset : offset + meta.nbytes]
        out.append((meta.name, piece.view(getattr(torch, meta.dtype)).view(meta.shape)))
        offset += meta.span
    return out


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(-1).view(torch.uint8)


def send_buckets(group: "Group", named: Iterable[tuple[str, torch.Tensor]], meta: WireMeta,
                 limit: int, device: str | torch.device = "cpu") -> Exception | None:
    """The learner's side (rank 0): broadcast `named`, which must follow `meta`'s order, bucket by
    bucket; each tensor is copied into the bucket as it arrives (under ZeRO-3 it is gathered only
    while the iterator stands on it). At most one bucket of `limit` bytes is held at a time; a
    tensor larger than that is sent as it is.

    A failed broadcast (a member died) does not stop the iteration: every learner rank gathers each
    parameter together, and a rank 0 that stopped early would leave the others waiting in a
    collective. The error is returned once `named` is exhausted.
    """
    buckets = plan_buckets([t.span for t in meta.tensors], limit)
    last_of = {bucket.stop - 1: bucket for bucket in buckets}
    largest = max((bucket_nbytes([meta.tensors[i] for i in b]) for b in buckets if len(b) > 1), default=0)
    buffer = torch.empty(largest, dtype=torch.uint8, device=device) if largest else None
    error, offset, count = None, 0, 0
    for index, (name, tensor) in enumerate(named):
        expected, count = meta.tensors[index], index + 1
        if name != expected.name:
            raise ValueError(f"tensor {index} is {name}, but the sync's metadata says {expected.name}")
        if error is not None:
            continue
        data = as_bytes(tensor.detach().to(getattr(torch, expected.dtype)))
        try:
            if index in last_of and len(last_of[index]) == 1:  # a bucket of its own: no copy
                group.broadcast(data)
                continue
            buffer[offset : offset + data.numel()].copy_(data)
            if index in last_of:
                group.broadcast(buffer[: offset + data.numel()])
                offset = 0
            else:
                offset += expected.span
        except RuntimeError as exc:  # gloo: "Connection closed by peer", or a member's timeout
            error = exc
    if count != len(meta.tensors) and error is None:
        raise ValueError(f"{count} tensors sent, but the sync's metadata lists {len(meta.tensors)}")
    return error


def receive_buckets(group: "Group", meta: WireMeta, limit: int,
                    device: str = "cpu") -> Iterable[list[tuple[str, torch.Tensor]]]:
    """The engine's side: each bucket as (name, tensor) pairs, in order, as rank 0 broadcasts it.
    The next bucket's receive is posted before this one is handed over, so it arrives while the
    caller loads this one (two buckets in memory at most, each a fresh buffer)."""
    def post(bucket: range):
        metas = [meta.tensors[i] for i in bucket]
        buffer = torch.empty(bucket_nbytes(metas), dtype=torch.uint8, device=device)
        return metas, buffer, group.start_broadcast(buffer)

    pending = None
    for bucket in plan_buckets([t.span for t in meta.tensors], limit):
        posted = post(bucket)
        if pending is not None:
            yield _arrived(*pending)
        pending = posted
    if pending is not None:
        yield _arrived(*pending)


def _arrived(metas, buffer, work) -> list[tuple[str, torch.Tensor]]:
    work.wait()
    return unpack(buffer, metas)


class Group:
    """This process's member of the transfer group, made from torch alone: no global process group,
    so it never meets the learners' own DeepSpeed group. Rank 0 hosts the store."""

    def __init__(self, address: GroupAddress, rank: int):
        timeout = datetime.timedelta(seconds=address.timeout_s)
        self.rank, self.address = rank, address
        self._store = dist.TCPStore(address.host, address.port, address.world_size, is_master=rank == 0,
                                    timeout=timeout, wait_for_workers=False)
        if address.backend == "nccl":  # GPU: untested here (no GPU in this repository's CI)
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self._group = dist.ProcessGroupNCCL(self._store, rank, address.world_size, options)
        else:
            self._group = dist.ProcessGroupGloo(self._store, rank, address.world_size, timeout)

    def broadcast(self, buffer: torch.Tensor) -> None:
        """Rank 0's `buffer` into every member's; returns once this member's part is done."""
        self.start_broadcast(buffer).wait()

    def start_broadcast(self, buffer: torch.Tensor):
        """The same, returning at once: `.wait()` on the answer (broadcasts run in the order started)."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        return self._group.broadcast([buffer], options)

    def close(self) -> None:
        self._group = self._store = None


def ipc_buckets(named: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype, limit: int, device_uuid: str,
                reduce: Callable[[torch.Tensor], tuple]) -> tuple[list[dict], list[torch.Tensor]]:
    """Colocated (rollout.colocate): vLLM's IPC update info for `named`, which live on this process's
    GPU, one dict per bucket of at most `limit` bytes (so no one message grows with the model), and
    the copies made for tensors not already contiguous in `dtype`; the caller holds those until the
    engine has loaded them. The other tensors are shared as they are: no copy. `reduce(tensor)`: the
    handle's rebuild arguments (torch's `reduce_tensor(tensor)[1]`)."""
    shared, copies = [], []
    for name, tensor in named:
        tensor = tensor.detach()
        if tensor.dtype != dtype or not tensor.is_contiguous():
            tensor = tensor.to(dtype).contiguous()
            copies.append(tensor)
        shared.append((TensorMeta.of(name, tensor), tensor))
    infos = []
    for bucket in plan_buckets([meta.nbytes for meta, _ in shared], limit):
        part = [shared[i] for i in bucket]
        infos.append({"names": [m.name for m, _ in part], "dtype_names": [m.dtype for m, _ in part],
                      "shapes": [list(m.shape) for m, _ in part],
                      "ipc_handles": [{device_uuid: reduce(t)} for _, t in part]})
    return infos, copies
