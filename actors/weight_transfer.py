"""The rollout engine's end of the streamed weight sync: a backend of vLLM's weight-transfer API.

vLLM builds one `StreamEngine` in each of an engine's worker processes (every tensor-parallel shard)
when the engine was started with `weight_transfer_config={"backend": ...}` naming one of ours. The
registration must run in those processes before the model loads: `weight_loading.py`, the worker
extension vLLM imports there, calls `register()` at import. The wire (bucket plan, metadata, the
torch process group) is `innerloop.distributed.transfer`, which the learner's side imports too.

vLLM's calls, each reaching every worker process of the engine: `init_weight_transfer_engine` (join
the group), then per sync `start_weight_update` (layerwise reload: parameters back to their
recorded metadata), `update_weights` (receive every bucket and `model.load_weights` it: Hugging Face
names mapped onto the fused layers, each shard narrowing its part), `finish_weight_update` (layers
not yet processed, then the tied head), and `shutdown_weight_transfer_engine`.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

from innerloop.distributed.transfer import Group, GroupAddress, WireMeta, receive_buckets

# Ours, by the torch process-group backend they use; vLLM's own "nccl" backend needs vLLM's NCCL
# communicator on the trainer's side too, which the learner (no vLLM there) cannot open.
BACKENDS = {"gloo": "gloo", "nccl": "innerloop_nccl"}  # rollout.sync_backend -> registered name


@dataclass
class StreamInitInfo(WeightTransferInitInfo):
    host: str
    port: int
    world_size: int
    bucket_bytes: int
    timeout_s: float
    backend: str
    rank_offset: int


@dataclass
class StreamUpdateInfo(WeightTransferUpdateInfo):
    names: list
    dtype_names: list
    shapes: list


class StreamEngine(WeightTransferEngine[StreamInitInfo, StreamUpdateInfo]):
    init_info_cls = StreamInitInfo
    update_info_cls = StreamUpdateInfo
    supports_draft_weight_update = False
    _group: Group | None = None

    def init_transfer_engine(self, info: StreamInitInfo) -> None:
        self.shutdown()  # a re-formed pool's group replaces the old one
        parallel = self.parallel_config
        rank = parallel.data_parallel_index * parallel.world_size + parallel.rank + info.rank_offset
        address = GroupAddress(info.host, info.port, info.world_size, info.bucket_bytes, info.timeout_s, info.backend)
        self._group = Group(address, rank)

    def start_weight_update(self) -> None:
        initialize_layerwise_reload(self.model)

    def receive_weights(self, info: StreamUpdateInfo) -> None:
        if self._group is None:
            raise RuntimeError("no transfer group: init_weight_transfer_engine first")
        meta = WireMeta.from_update_info(info.names, info.dtype_names, info.shapes)
        try:
            for pairs in receive_buckets(self._group, meta, self._group.address.bucket_bytes, str(self.device)):
                self.model.load_weights(pairs)
        except BaseException:
            # A member died or timed out: put every layer back in place (partly old weights: the pool
            # then reloads this engine from the object store) and drop the broken group.
            self.finish_weight_update()
            self.shutdown()
            raise

    def finish_weight_update(self) -> None:
        finalize_layerwise_reload(self.model, self.model_config)
        reprocess_tied_head(self.model)

    def shutdown(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None


def register() -> None:
    """Make our backends known to vLLM's factory in this process (once; the factory refuses twice)."""
    for name in BACKENDS.values():
        if name not in WeightTransferEngineFactory._registry:
            WeightTransferEngineFactory.register_engine(name, StreamEngine)


def reprocess_tied_head(model) -> None:
    """Redo the LM head's post-load processing when it shares the input embeddings' weight.

    A tied head loads no weights of its own, so vLLM's in-place reload skips its processing; on the
    CPU that processing packs the weight into a oneDNN handle, which would go on computing logits
    with the *old* weights (found by tests/test_integration.py: engine and learner log-probs parted).
    """
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    weight, method = getattr(head, "weight", None), getattr(head, "quant_method", None)
    if weight is None or method is None or getattr(embed, "weight", None) is None:
        return
    if weight.numel() and weight.data_ptr() == embed.weight.data_ptr():
        method.process_weights_after_loading(head)
