"""learner.lora (learners/lora.py): only the adapter trains; what leaves the learner is the merged model
under the base model's names; the KL reference is the base with the adapter off; bad targets are
refused before anything starts. Pure torch and peft on the tiny Llama of tests/tiny_model.py (float32),
and the learner's own update on a stand-in engine (no Ray, no DeepSpeed engine)."""

from __future__ import annotations

import pytest
import torch

from innerloop.distributed.config import AlgorithmConfig, ConfigError, LearnerConfig, LoraConfig
from innerloop.distributed.config_load import load_config
from innerloop.distributed.run.samples import loss_normalizers
from innerloop.learners import lora
from innerloop.learners.learner import Learner
from tests.test_mini_batches import samples_of
from tests.test_sft_data import StandInEngine
from tests.tiny_model import build_tiny_model

LEAVES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def base_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def trained_adapter(model, seed: int = 3):
    """The adapter as training would leave it: every A and B away from its start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lora.trainable_parameters(model):
            param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    return model


IDS = torch.tensor([[1, 5, 9, 14, 30, 2, 7, 11]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- training only the adapter


def test_only_the_adapter_requires_and_gets_gradients(model_folder):
    model = lora.wrap(base_model(model_folder), LoraConfig(rank=4, alpha=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * len(LEAVES)  # A and B of 7 projections in each of 2 layers
    model(input_ids=IDS).logits.logsumexp(-1).sum().backward()
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name
    # B starts at zero, so only B's gradient is nonzero on the first step (A's is B^T times something).
    assert all(bool(p.grad.any()) for n, p in model.named_parameters() if ".lora_B." in n)


def test_a_fresh_adapter_is_the_base_model(model_folder):
    base = base_model(model_folder)
    want = logits(base)
    model = lora.wrap(base, LoraConfig())
    assert lora.adapter_untrained(model)
    torch.testing.assert_close(logits(model), want, atol=0, rtol=0)


def test_null_targets_are_every_projection_and_a_suffix_matches_like_peft(model_folder):
    assert lora.resolve_targets(base_model(model_folder), LoraConfig()) == LEAVES
    model = lora.wrap(base_model(model_folder), LoraConfig(target_modules=["self_attn.q_proj", "down_proj"]))
    adapted = {n.rpartition(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted == {f"base_model.model.model.layers.{i}.{m}" for i in range(2)
                       for m in ("self_attn.q_proj", "mlp.down_proj")}


# ---------------------------------------------------------------- the merged model


def test_merged_weights_are_base_plus_b_a_times_scale_under_the_base_names(model_folder):
    base = base_model(model_folder)
    base_state = {n: p.detach().clone() for n, p in base.named_parameters()}
    cfg = LoraConfig(rank=4, alpha=12)
    model = trained_adapter(lora.wrap(base, cfg))
    merged = dict(lora.merged_weights(model))
    assert list(merged) == list(base_state)  # the names and order of the base model's own parameters
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
              if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    assert len(layers) == 2 * len(LEAVES)
    for name, tensor in merged.items():
        module = layers.get(name.removesuffix(".weight"))
        if module is None:
            assert torch.equal(tensor, base_state[name]), f"{name} is no LoRA layer but changed"
            continue
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        want = base_state[name] + (b @ a) * (cfg.alpha / cfg.rank)
        torch.testing.assert_close(tensor, want, atol=1e-6, rtol=0)
        assert not torch.equal(tensor, base_state[name])
    # The frozen weights themselves were never merged in place.
    frozen = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p for n, p in model.named_parameters()
              if not p.requires_grad}
    assert frozen.keys() == base_state.keys() and all(torch.equal(frozen[n], base_state[n]) for n in frozen)


def test_a_plain_model_with_the_merged_weights_computes_what_the_adapted_model_does(model_folder):
    model = trained_adapter(lora.wrap(base_model(model_folder), LoraConfig(rank=8, alpha=16)))
    plain = base_model(model_folder)
    missing, unexpected = plain.load_state_dict(dict(lora.merged_weights(model)), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding: sent once
    torch.testing.assert_close(logits(plain), logits(model), atol=1e-5, rtol=0)


def test_the_sync_metadata_follows_the_merged_tensors(model_folder):
    model = trained_adapter(lora.wrap(base_model(model_folder), LoraConfig()))
    shapes = [(n, tuple(p.shape)) for n, p in lora.base_shapes(model)]
    assert shapes == [(n, tuple(t.shape)) for n, t in lora.merged_weights(model)]


def test_the_saved_adapter_loads_with_peft_onto_the_base(model_folder, tmp_path):
    from peft import PeftModel

    model = trained_adapter(lora.wrap(base_model(model_folder), LoraConfig(rank=4, alpha=8)))
    lora.save_adapter(model, tmp_path / "adapter", str(model_folder), lora.adapter_state(model))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(base_model(model_folder), str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


# ---------------------------------------------------------------- the KL reference


def test_the_reference_is_the_base_model_and_leaves_the_policy_gradient_alone(model_folder):
    want_base = logits(base_model(model_folder))
    model = trained_adapter(lora.wrap(base_model(model_folder), LoraConfig()))
    reference = lora.AdapterDisabled(model)

    def gradients(with_reference: bool):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=IDS).logits.logsumexp(-1).sum()
        if with_reference:  # as the GRPO loss does: the policy's forward, then the reference's
            torch.testing.assert_close(reference(input_ids=IDS).logits, want_base, atol=1e-6, rtol=0)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, around = gradients(False), gradients(True)
    assert plain.keys() == around.keys() and all(torch.equal(plain[k], around[k]) for k in plain)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)  # restored after
    assert not torch.allclose(logits(model), want_base)  # the policy itself is the adapted one


def lora_learner(model, algorithm: AlgorithmConfig, lr: float) -> Learner:
    """The real Learner's update on a stand-in engine over a LoRA model; SGD on the adapter alone."""
    learner = Learner.__new__(Learner)  # no process group, no DeepSpeed engine: only what an update reads
    learner.rank, learner.world_size, learner._pad_id, learner._reference = 0, 1, 0, None
    learner._cfg = LearnerConfig(micro_batch_size=4, lora=LoraConfig(rank=4, alpha=8))
    learner._algo, learner._temperature, learner._dtype = algorithm, 0.7, torch.float32
    engine = StandInEngine(model, 4, 1)
    engine.module = model
    optimizer = torch.optim.SGD(lora.trainable_parameters(model), lr=lr)
    boundary = []
    engine.set_gradient_accumulation_boundary = boundary.append

    norms = []

    def step():
        if boundary and boundary[-1]:
            norms.append(float(torch.cat([p.grad.flatten() for p in lora.trainable_parameters(model)]).norm()))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    engine.step, engine.get_global_grad_norm = step, lambda: norms[-1]
    learner.engine = engine
    return learner


def test_the_learner_update_with_kl_moves_only_the_adapter_against_the_base_reference(model_folder):
    base = base_model(model_folder)
    vocab = base.config.vocab_size
    base_state = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = lora.wrap(base, LoraConfig(rank=4, alpha=8))
    algorithm = AlgorithmConfig(kl_coef=0.5)
    learner = lora_learner(model, algorithm, lr=0.5)
    samples = [s for s in samples_of(8, seed=2)]
    assert max(max(s.input_ids) for s in samples) < vocab
    first = learner.update(samples, loss_normalizers(samples, algorithm))
    assert isinstance(learner._reference, lora.AdapterDisabled)  # the start is the base: no copy made
    assert first.sums.kl == pytest.approx(0.0, abs=1e-9)  # a fresh adapter is the base model
    second = learner.update(samples, loss_normalizers(samples, algorithm))
    assert second.sums.kl > 0  # the adapter moved away from the base it is held to
    assert not lora.adapter_untrained(model)
    # What the learner publishes: base names, frozen weights unchanged except through the merge.
    published = dict(learner._named_weights())
    assert list(published) == list(base_state)
    assert torch.equal(published["model.embed_tokens.weight"], base_state["model.embed_tokens.weight"])
    assert not torch.equal(published["model.layers.0.mlp.up_proj.weight"], base_state["model.layers.0.mlp.up_proj.weight"])
    assert [t.name for t in learner.weights_meta().tensors] == list(base_state)
    state = learner.full_state_dict()
    assert list(state) == list(base_state) and all(torch.equal(state[k], published[k]) for k in state)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("targets", [["qproj"], ["lm_head"], ["embed_tokens"], ["q_proj", "attn.c_attn"]])
def test_targets_matching_no_linear_layer_are_refused_naming_the_candidates(model_folder, targets):
    with pytest.raises(lora.LoraTargetError) as error:
        lora.check_targets(str(model_folder), LoraConfig(target_modules=targets))
    message = str(error.value)
    assert "learner.lora.target_modules" in message and str([t for t in targets if t != "q_proj"]) in message
    assert str(LEAVES) in message


def run_config(model_folder, *overrides):
    return load_config(None, [f"model.name={model_folder}", "model.dtype=float32", *overrides])


def test_the_start_checks_refuse_bad_targets_before_any_actor(model_folder):
    from innerloop.distributed.run.checks import check_lora

    check_lora(run_config(model_folder), str(model_folder))  # no LoRA: nothing to check
    check_lora(run_config(model_folder, "learner.lora.rank=4"), str(model_folder))
    with pytest.raises(ConfigError, match=r"match no Linear layer.*'q_proj', 'k_proj'"):
        check_lora(run_config(model_folder, "learner.lora.target_modules=[query]"), str(model_folder))


def test_the_config_section_validates_its_values():
    assert LearnerConfig().lora is None
    assert LearnerConfig(lora={}).lora == LoraConfig()
    for bad in ({"rank": 0}, {"alpha": 0}, {"dropout": 1.0}, {"target_modules": []}, {"ranks": 4}):
        with pytest.raises(ValueError):
            LoraConfig(**bad)
