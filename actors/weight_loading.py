"""Runs inside each vLLM worker process: loads a versioned weight file into the live model.

vLLM imports this class by its dotted path (`worker_extension_cls`) and mixes it into its worker,
so `collective_rpc("innerloop_load_weights", ...)` reaches every worker of a (multiprocess) engine.
Only a path crosses the process boundary: the tensors travel through a shared-memory file, because
tensors sent as RPC arguments arrive as lists in vLLM's multiprocess engine.
"""

from __future__ import annotations


class WeightLoadingExtension:
    # The name must not clash with vLLM's own worker methods (its CPU worker has `update_weights`).
    def innerloop_load_weights(self, path: str) -> int:
        from safetensors.torch import load_file

        weights = load_file(path, device="cpu")
        # vLLM's in-place reload maps Hugging Face names onto its fused layers (qkv, gate_up) and
        # redoes the CPU backend's weight repacking; a plain `model.load_weights` would write into
        # the parameters that repacking already emptied.
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        _reprocess_tied_head(self.model_runner.model)
        return len(weights)

    def innerloop_seed(self, seed: int) -> None:
        # Requests carry no seed of their own (a per-request seed crashes vLLM's CPU sampler), so they
        # draw from the worker's global generator; seeding it per step makes a step's samples a
        # function of (seed, step, weights), whatever ran before: a resumed run draws what the
        # uninterrupted one drew.
        import torch

        torch.manual_seed(seed)


def _reprocess_tied_head(model) -> None:
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
