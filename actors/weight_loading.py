"""Runs inside each vLLM worker process: loads a versioned weight file into the live model.

vLLM imports this class by its dotted path (`worker_extension_cls`) and mixes it into its worker,
so `collective_rpc("innerloop_load_weights", ...)` reaches every worker of a (multiprocess) engine.
Only a path crosses the process boundary: the tensors travel through a shared-memory file, because
tensors sent as RPC arguments arrive as lists in vLLM's multiprocess engine.

Importing this module also registers innerloop's streamed weight-transfer backends with vLLM
(actors/weight_transfer.py): vLLM imports it in every worker process before the model loads.
"""

from __future__ import annotations

from innerloop.actors.weight_transfer import register, reprocess_tied_head

register()


class WeightLoadingExtension:
    # The name must not clash with vLLM's own worker methods (its CPU worker has `update_weights`).
    def innerloop_load_weights(self, path: str) -> int:
        from safetensors.torch import load_file

        weights = load_file(path, device="cpu")
        # vLLM's in-place reload maps Hugging Face names onto its fused layers (qkv, gate_up) and
        # redoes the CPU backend's weight repacking; a plain `model.load_weights` would write into
        # the parameters that repacking already emptied.
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        reprocess_tied_head(self.model_runner.model)
        return len(weights)

    def innerloop_seed(self, seed: int) -> None:
        # Requests carry no seed of their own (a per-request seed crashes vLLM's CPU sampler), so they
        # draw from the worker's global generator; seeding it per step makes a step's samples a
        # function of (seed, step, weights), whatever ran before: a resumed run draws what the
        # uninterrupted one drew.
        import torch

        torch.manual_seed(seed)

