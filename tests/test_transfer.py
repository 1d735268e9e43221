"""The streamed weight sync's wire (distributed/transfer.py): bucket plan, packing, a real gloo group."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from innerloop.distributed.transfer import (Group, GroupAddress, TensorMeta, WireMeta, plan_buckets, receive_buckets,
                                            send_buckets)


class Recorder:
    """Rank 0's side of a group: keeps a copy of every broadcast and the buffers it was handed."""

    def __init__(self, fail_at: int | None = None):
        self.sent: list[torch.Tensor] = []
        self.handed: list[torch.Tensor] = []
        self.fail_at = fail_at

    def broadcast(self, buffer: torch.Tensor) -> None:
        if self.fail_at is not None and len(self.sent) == self.fail_at:
            raise RuntimeError("Connection closed by peer")
        self.handed.append(buffer)
        self.sent.append(buffer.clone())


class Replayer:
    """A receiving member: fills each buffer with what rank 0 sent."""

    def __init__(self, sent: list[torch.Tensor]):
        self._sent = iter(sent)

    def broadcast(self, buffer: torch.Tensor) -> None:
        buffer.copy_(next(self._sent))

    def start_broadcast(self, buffer: torch.Tensor):
        self.broadcast(buffer)
        return self

    def wait(self) -> None:
        pass


def weights() -> list[tuple[str, torch.Tensor]]:
    torch.manual_seed(0)
    return [("embed", torch.randn(16, 8)), ("norm", torch.randn(8).to(torch.bfloat16)),
            ("scale", torch.tensor(3.5)), ("q", torch.randn(4, 8)), ("k", torch.randn(4, 8)),
            ("step", torch.arange(5, dtype=torch.int64))]


def meta_of(named) -> WireMeta:
    return WireMeta(tuple(TensorMeta.of(n, t) for n, t in named))


@pytest.mark.parametrize("sizes, limit, expected", [
    ([4, 4, 4], 8, [[0, 1], [2]]),
    ([4, 4, 4], 12, [[0, 1, 2]]),
    ([4, 20, 4], 8, [[0], [1], [2]]),  # larger than a bucket: alone
    ([20, 4, 4], 8, [[0], [1, 2]]),
    ([3, 3, 3, 3], 7, [[0, 1], [2, 3]]),
    ([], 8, []),
])
def test_buckets_are_consecutive_and_never_exceed_the_limit_but_for_a_lone_tensor(sizes, limit, expected):
    plan = plan_buckets(sizes, limit)
    assert [list(b) for b in plan] == expected
    assert all(sum(sizes[i] for i in b) <= limit or len(b) == 1 for b in plan)


@pytest.mark.parametrize("limit", [1, 40, 200, 10**6])
def test_a_round_trip_gives_back_every_tensor_bit_for_bit(limit):
    named = weights()
    meta = meta_of(named)
    sender = Recorder()
    assert send_buckets(sender, iter(named), meta, limit) is None
    assert len(sender.sent) == len(plan_buckets([t.span for t in meta.tensors], limit))
    received = [pair for bucket in receive_buckets(Replayer(sender.sent), meta, limit) for pair in bucket]
    assert [n for n, _ in received] == [n for n, _ in named]
    for (_, got), (_, want) in zip(received, named):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_no_bucket_holds_more_than_the_limit_and_a_large_tensor_is_sent_uncopied():
    named = weights()
    meta = meta_of(named)
    limit = 100  # embed (512 bytes) is larger than a bucket
    sender = Recorder()
    send_buckets(sender, iter(named), meta, limit)
    assert sender.handed[0].data_ptr() == named[0][1].data_ptr()  # the tensor itself, no copy
    originals = {t.data_ptr() for _, t in named}
    assert all(b.numel() <= limit or b.data_ptr() in originals for b in sender.handed)


def test_tensors_go_in_the_metadata_dtype():
    named = [("w", torch.randn(4, 4))]
    meta = WireMeta((TensorMeta("w", "bfloat16", (4, 4)),))
    sender = Recorder()
    send_buckets(sender, iter(named), meta, 1024)
    [[(_, got)]] = list(receive_buckets(Replayer(sender.sent), meta, 1024))
    assert got.dtype == torch.bfloat16 and torch.equal(got, named[0][1].to(torch.bfloat16))


def test_a_failed_broadcast_still_walks_every_tensor_and_reports_the_error():
    """Under ZeRO-3 every learner rank gathers each parameter together: rank 0 must not stop early."""
    named = weights()
    walked = []

    def gathered():
        for pair in named:
            walked.append(pair[0])
            yield pair

    error = send_buckets(Recorder(fail_at=1), gathered(), meta_of(named), 40)
    assert isinstance(error, RuntimeError) and walked == [n for n, _ in named]


def test_tensors_out_of_the_metadata_order_are_refused():
    named = weights()
    with pytest.raises(ValueError, match="metadata says embed"):
        send_buckets(Recorder(), iter(named[1:]), meta_of(named), 1024)


def test_the_update_info_round_trips_through_json_like_lists():
    meta = meta_of(weights())
    info = meta.update_info()
    assert WireMeta.from_update_info(**info) == meta
    assert meta.nbytes == sum(t.nbytes for _, t in weights())


def test_a_real_gloo_group_carries_the_weights_between_two_members():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = GroupAddress("127.0.0.1", port, world_size=2, bucket_bytes=64, timeout_s=30)
    named = weights()
    meta = meta_of(named)
    received: list = []

    def member():
        group = Group(address, 1)
        received.extend(pair for bucket in receive_buckets(group, meta, address.bucket_bytes) for pair in bucket)
        group.close()

    thread = threading.Thread(target=member)
    thread.start()
    group = Group(address, 0)
    assert send_buckets(group, iter(named), meta, address.bucket_bytes) is None
    thread.join(timeout=30)
    group.close()
    assert all(torch.equal(got, want) for (_, got), (_, want) in zip(received, named)) and len(received) == len(named)
