"""The learner's end of the colocated weight sync (rollout.colocate, GPU only): CUDA IPC handles.

Each learner rank shares its parameters with the rollout engine on its own GPU, which loads them in
place through vLLM's "ipc" weight-transfer backend; the bytes never leave the GPU. The bucketing and
the message format are distributed/transfer.py's (`ipc_buckets`), in torch alone.
"""

from __future__ import annotations

import torch

from innerloop.distributed.transfer import ipc_buckets


class ColocatedWeights:
    """Mixed into the Learner: needs `engine` (DeepSpeed's), `_named_weights`, `_dtype` and `_cfg.zero_stage`."""

    _ipc_copies: list[torch.Tensor] = []

    def ipc_weight_handles(self, limit: int) -> list[dict]:
        """vLLM IPC update infos for this rank's parameters, bucket by bucket. Under ZeRO-1/2 each rank
        holds the whole bf16 model, so every rank serves its own engine; the handles stay valid until
        `release_ipc_handles`."""
        from torch.multiprocessing.reductions import reduce_tensor

        if self._cfg.zero_stage == 3:  # refused at start (run/checks.py); said again where it matters
            raise RuntimeError("the colocated sync needs whole parameters on every rank (ZeRO stage <= 2)")
        device = torch.cuda.current_device()
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        torch.cuda.synchronize(device)  # the update's last writes land before the engine reads
        # The published weights (`_named_weights`): with LoRA, merged tensors made here, kept with the copies.
        named = list(self._named_weights())
        infos, copies = ipc_buckets(named, self._dtype, limit, uuid, lambda tensor: reduce_tensor(tensor)[1])
        self._ipc_copies = copies + [tensor for _, tensor in named]
        return infos

    def release_ipc_handles(self) -> None:
        """Every engine has loaded (or given up): drop the copies, and the handles' references."""
        self._ipc_copies = []
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()
