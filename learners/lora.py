"""LoRA adapters on the learner's policy (learner.lora), through peft: peft's one home in innerloop.

Only the adapter trains (each targeted Linear layer's W stays frozen; x W^T + x A^T B^T * alpha / r is
its output). Everything that leaves the learner sees a normal model, under the base model's own
parameter names: the weights a sync publishes and the exported model folder are the merged ones,
W + B @ A * alpha / r, computed on the fly one layer at a time (the learner's copy is never merged in
place, so training goes on from the unmerged adapter). The KL reference is the same model with the
adapter switched off (`AdapterDisabled`): the base weights, with no second copy of them.

Targets: learner.lora.target_modules names Linear layers the way peft matches them (a name equals the
module's full name or ends it after a dot, e.g. "q_proj" or "self_attn.q_proj"); null is every Linear
layer but the output head (attention and MLP projections in a Llama). The output head and embeddings
are never targets: they are tied in small models, and a merged delta on one would change the other.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import torch

from innerloop.distributed.config import LoraConfig

ADAPTER = "default"  # peft's name for the one adapter
ADAPTER_FOLDER = "adapter"  # inside an exported model folder: the adapter alone, in peft's format

Gather = Callable[[list[torch.nn.Parameter]], ContextManager]  # ZeRO-3: whole parameters while inside


class LoraTargetError(ValueError):
    """learner.lora.target_modules names something the model has no Linear layer for."""


def _no_gather(params: list[torch.nn.Parameter]) -> ContextManager:
    return contextlib.nullcontext()


# ---------------------------------------------------------------- targets


def _output_head(model) -> torch.nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if getter is not None else None


def linear_layers(model) -> list[str]:
    """Full names of the model's Linear layers that may carry an adapter (the output head excluded)."""
    head = _output_head(model)
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head]


def linear_leaf_names(model) -> list[str]:
    """The distinct last parts of those names, in the model's order: what target_modules usually lists."""
    return list(dict.fromkeys(name.rpartition(".")[2] for name in linear_layers(model)))


def _matches(target: str, name: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's rule for a list of names


def resolve_targets(model, lora: LoraConfig) -> list[str]:
    """The target_modules peft gets: the configured ones, each checked to match at least one Linear
    layer; null: every Linear layer's leaf name. Raises LoraTargetError listing the candidates."""
    layers = linear_layers(model)
    if not layers:
        raise LoraTargetError("learner.lora: the model has no Linear layer (other than its output head) to adapt")
    if lora.target_modules is None:
        return linear_leaf_names(model)
    unmatched = [t for t in lora.target_modules if not any(_matches(t, name) for name in layers)]
    if unmatched:
        raise LoraTargetError(
            f"learner.lora.target_modules {unmatched} match no Linear layer of the model (the output head and "
            f"embeddings are never targets); its Linear layers are named {linear_leaf_names(model)}: list some of "
            "those, or null for all of them")
    return list(lora.target_modules)


def check_targets(model_path: str, lora: LoraConfig) -> list[str]:
    """`resolve_targets` on the model folder's architecture, built on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return resolve_targets(model, lora)


# ---------------------------------------------------------------- wrapping


def wrap(model, lora: LoraConfig):
    """The model with a fresh LoRA adapter (B = 0: it starts as the base model); only the adapter's
    parameters require gradients. The adapter takes the model's dtype."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=resolve_targets(model, lora), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config, autocast_adapter_dtype=False)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _lora_layers(base) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    found = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, module in found.items():
        if not isinstance(module, LoraLinear):  # only Linear targets are allowed (resolve_targets)
            raise TypeError(f"{name}: a {type(module).__name__} adapter; innerloop merges Linear ones only")
    return found


def adapter_untrained(model) -> bool:
    """Every B is still zero: the policy equals the base model."""
    return all(not bool(m.lora_B[ADAPTER].weight.any()) for m in _lora_layers(model.get_base_model()).values())


# ---------------------------------------------------------------- the merged model, by base names


def _base_modules(model) -> Iterator[tuple[str, torch.nn.Module, bool, list[tuple[str, torch.nn.Parameter]]]]:
    """(name prefix, module, is a LoRA layer, its own parameters) of the model without its adapter, in
    one order on every rank; a LoRA layer's submodules come with it, tied weights once."""
    base = model.get_base_model()
    layers, seen = _lora_layers(base), set()
    skip = tuple(f"{name}." for name in layers)  # a LoRA layer's submodules: produced with the layer
    for name, module in base.named_modules():
        if name.startswith(skip):
            continue
        prefix = f"{name}." if name else ""
        if name in layers:
            yield prefix, module, True, []
            continue
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        yield prefix, module, False, own


def _walk(model, merge: bool, gather: Gather) -> Iterator[tuple[str, torch.Tensor]]:
    """(base name, tensor) of every parameter of the model without its adapter (`_base_modules`' order).
    merge: a LoRA layer's weight is W + B @ A * scale (computed in float32, returned in W's dtype), else
    the parameter itself. Under ZeRO-3 `gather` makes each module's own parameters whole while its
    tensors are produced."""
    for prefix, module, is_lora, own in _base_modules(model):
        if is_lora:
            inner = module.get_base_layer()
            owned = [p for p in (inner.weight, inner.bias) if p is not None]
            adapter = [module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight]
            with gather(owned + (adapter if merge else [])):
                weight = inner.weight.data
                if merge:
                    delta = module.lora_B[ADAPTER].weight.float() @ module.lora_A[ADAPTER].weight.float()
                    weight = (weight.float() + delta * module.scaling[ADAPTER]).to(inner.weight.dtype)
                yield prefix + "weight", weight
                if inner.bias is not None:
                    yield prefix + "bias", inner.bias.data
            continue
        for pname, param in own:
            with gather([param]):
                yield prefix + pname, param.data


def merged_weights(model, gather: Gather = _no_gather) -> Iterator[tuple[str, torch.Tensor]]:
    """(base model's name, merged tensor): what the rollout engines and exported folders get."""
    return _walk(model, merge=True, gather=gather)


def base_shapes(model) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(base name, the parameter a merged tensor replaces): names and shapes for a sync's metadata,
    in `merged_weights`' order, without computing anything."""
    for prefix, module, is_lora, own in _base_modules(model):
        if is_lora:
            inner = module.get_base_layer()
            own = [(n, p) for n, p in (("weight", inner.weight), ("bias", inner.bias)) if p is not None]
        yield from ((prefix + n, p) for n, p in own)


# ---------------------------------------------------------------- the KL reference


class AdapterDisabled:
    """The KL reference when it is the base model: the policy's own forward with the adapter off.

    Called like a model (keyword arguments) under no_grad. peft's context also clears the adapter's
    requires_grad while inside and sets it again on leaving, so the policy's graph is unaffected."""

    def __init__(self, model):
        self._model = model

    def __call__(self, **kwargs):
        with torch.no_grad(), self._model.disable_adapter():
            return self._model(**kwargs)


# ---------------------------------------------------------------- the adapter on disk


def adapter_state(model, gather: Gather = _no_gather) -> dict[str, torch.Tensor]:
    """The adapter's tensors, whole, under the peft model's own names (every rank calls it together
    under ZeRO-3; each gets a copy)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with gather([p for _, p in named]):
        return {n: p.data.detach().clone() for n, p in named}


def save_adapter(model, folder: Path, base_model: str, state: dict[str, torch.Tensor]) -> None:
    """The adapter alone in peft's format (adapter_config.json, adapter_model.safetensors): load it with
    `PeftModel.from_pretrained(base, folder)`, or give it to an engine that serves LoRA adapters.
    `state`: `adapter_state(model)`."""
    config = model.peft_config[ADAPTER]
    saved_base = config.base_model_name_or_path
    config.base_model_name_or_path = base_model
    try:
        model.save_pretrained(str(folder), state_dict=state, safe_serialization=True)
    finally:
        config.base_model_name_or_path = saved_base
