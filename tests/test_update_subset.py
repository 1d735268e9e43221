"""The update subset (support set): advantages over all G trajectories of a question, the
policy-gradient term only on a seeded random m of them (CPU, pure torch, a tiny random model)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from innerloop.distributed.config import AlgorithmConfig, ConfigError

from innerloop.distributed.config_load import load_config
from innerloop.distributed.records import TrainingSample, Trajectory
from innerloop.distributed.run.samples import build_samples, group_advantages, loss_normalizers
from innerloop.learners import grpo
from innerloop.learners.batching import collate
from innerloop.learners import update_steps
from innerloop.learners.logprobs import entropy_from_logits, token_logprobs

V = 11  # vocabulary of the tiny model
CLIP = dict(clip_low=0.2, clip_high=0.28)


def samples_of(groups, algorithm, **kwargs):
    """The driver's two phases: advantages within each group, then one training sample per trajectory."""
    return build_samples(groups, group_advantages(groups, algorithm), algorithm, **kwargs)


class TinyLM(torch.nn.Module):
    """Embedding then a linear head: logits [B, T, V] that depend on weights, seeded, float64."""

    def __init__(self, seed: int = 0, hidden: int = 6):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(V, hidden, generator=g, dtype=torch.float64))
        self.head = torch.nn.Parameter(torch.randn(hidden, V, generator=g, dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None, logits_to_keep: int = 0):
        logits = self.embed[input_ids] @ self.head
        return SimpleNamespace(logits=logits[:, -logits_to_keep:])  # -0: every position


def make_groups(num_questions: int = 3, G: int = 4, seed: int = 0) -> list[list[Trajectory]]:
    """Groups of G trajectories with unequal lengths and distinct rewards (every advantage non-zero)."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for q in range(num_questions):
        group = []
        for j in range(G):
            prompt, completion = 2 + (q + j) % 3, 1 + (2 * q + j) % 4
            ids = torch.randint(0, V, (prompt + completion,), generator=g).tolist()
            group.append(Trajectory(
                question_id=f"q{q}", prompt_ids=tuple(ids[:prompt]), completion_ids=tuple(ids[prompt:]),
                logprobs=(-0.5,) * completion, finish_reason="stop", text="", reward=float((3 * j + q) % G),
                correct=False, formatted=True, policy_version=0))
        groups.append(group)
    return groups


def algorithm(m: int | None, mask_by_update: bool = False, aggregation: str = "token") -> AlgorithmConfig:
    return AlgorithmConfig(update_subset=m, mask_kl_and_entropy_by_update=mask_by_update, aggregation=aggregation)


def updates(samples: list[TrainingSample]) -> list[bool]:
    return [s.update for s in samples]


def forward(model: TinyLM, samples: list[TrainingSample]):
    """Log-probs, entropy and a fixed reference's log-probs of the collated samples."""
    batch = collate(samples, pad_id=0)
    logits = model(batch.input_ids).logits
    ref_logprobs = token_logprobs(TinyLM(seed=1)(batch.input_ids).logits, batch.input_ids).detach()
    return batch, token_logprobs(logits, batch.input_ids), entropy_from_logits(logits), ref_logprobs


def loss_of(batch, logprobs, entropy, ref_logprobs, update_mask, normalizers):
    """The learner's loss: on-policy (old = current, detached), KL and entropy terms switched on."""
    return grpo.grpo_loss(
        logprobs, logprobs.detach(), batch.advantages, batch.loss_mask, update_mask, normalizers, **CLIP,
        aggregation=normalizers.aggregation, kl_coef=0.1, kl_estimator="k3", ref_logprobs=ref_logprobs,
        entropy=entropy, entropy_coef=0.01, mask_kl_and_entropy_by_update=normalizers.mask_kl_and_entropy_by_update)


# ---------------------------------------------------------------- m = G is plain GRPO


@pytest.mark.parametrize("mask_by_update", [False, True])
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_m_equal_g_is_plain_grpo_exactly(aggregation, mask_by_update):
    groups = make_groups()
    plain_samples = samples_of(groups, algorithm(None, aggregation=aggregation))
    subset_algo = algorithm(4, mask_by_update, aggregation)
    subset_samples = samples_of(groups, subset_algo, seed=123)
    assert all(updates(subset_samples)) and subset_samples == plain_samples

    # Plain GRPO: no update mask at all, normalizers over every sample.
    plain_model = TinyLM()
    batch, logprobs, entropy, ref = forward(plain_model, plain_samples)
    plain_norm = grpo.loss_normalizers(batch.loss_mask, None, aggregation)
    plain_loss, plain_metrics = loss_of(batch, logprobs, entropy, ref, None, plain_norm)
    plain_loss.backward()

    subset_model = TinyLM()
    batch, logprobs, entropy, ref = forward(subset_model, subset_samples)
    subset_norm = loss_normalizers(subset_samples, subset_algo)
    subset_loss, subset_metrics = loss_of(batch, logprobs, entropy, ref, batch.update_mask, subset_norm)
    subset_loss.backward()

    assert (subset_norm.policy, subset_norm.regularizer) == (plain_norm.policy, plain_norm.regularizer)
    assert torch.equal(subset_loss, plain_loss)
    assert subset_metrics.keys() == plain_metrics.keys()
    for key, value in plain_metrics.items():
        assert torch.equal(subset_metrics[key], value), key
    for (name, got), want in zip(subset_model.named_parameters(), plain_model.parameters()):
        assert torch.equal(got.grad, want.grad), name
        assert got.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- m = 1


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_m_equal_one_gives_one_policy_gradient_per_question(aggregation, seed):
    num_questions, G = 4, 4
    groups = make_groups(num_questions, G)
    samples = samples_of(groups, algorithm(1, aggregation=aggregation), seed=seed)
    batch = collate(samples, pad_id=0)
    logprobs = token_logprobs(TinyLM()(batch.input_ids).logits, batch.input_ids).detach().requires_grad_()

    policy_only, metrics = grpo.grpo_loss(  # no KL, no entropy: every gradient is the policy term's
        logprobs, logprobs.detach(), batch.advantages, batch.loss_mask, batch.update_mask,
        loss_normalizers(samples, algorithm(1, aggregation=aggregation)), **CLIP, aggregation=aggregation)
    policy_only.backward()

    has_grad = logprobs.grad.abs().sum(dim=1) > 0  # [B]
    assert torch.equal(has_grad, batch.update_mask)
    assert has_grad.view(num_questions, G).sum(dim=1).tolist() == [1] * num_questions
    update_tokens = batch.loss_mask[batch.update_mask].sum()
    assert float(metrics["policy_tokens"]) == float(update_tokens)
    if aggregation == "token":
        # On-policy d(loss)/d(logp) = -A / (tokens of the update subset): the per-token step does not
        # shrink with m, the normalizer counts only the subset.
        rows = batch.update_mask
        expected = -batch.advantages[rows].double().unsqueeze(1) / update_tokens * batch.loss_mask[rows]
        torch.testing.assert_close(logprobs.grad[rows], expected.double())


def test_advantages_use_all_g_whatever_m():
    groups = make_groups(num_questions=5, G=4)
    full = [s.advantage for s in samples_of(groups, algorithm(None))]
    assert any(a != 0 for a in full)
    for m in (1, 2, 3):
        assert [s.advantage for s in samples_of(groups, algorithm(m), seed=m)] == full


# ---------------------------------------------------------------- the seeded mask


def test_mask_is_reproducible_for_a_seed_and_differs_across_seeds():
    groups = make_groups(num_questions=8, G=4)
    first = updates(samples_of(groups, algorithm(2), seed=5))
    torch.manual_seed(999)  # other draws from torch's global generator must not move the subset
    torch.rand(10)
    assert updates(samples_of(groups, algorithm(2), seed=5)) == first
    assert [sum(first[i : i + 4]) for i in range(0, 32, 4)] == [2] * 8
    assert updates(samples_of(groups, algorithm(2), seed=6)) != first


def test_every_trajectory_can_be_picked():
    # Not simply the first m: over seeds, each position of a group gets the single update slot.
    groups = make_groups(num_questions=1, G=4)
    picked = {updates(samples_of(groups, algorithm(1), seed=seed)).index(True) for seed in range(50)}
    assert picked == {0, 1, 2, 3}


# ---------------------------------------------------------------- KL and entropy switch


@pytest.mark.parametrize("mask_by_update", [False, True])
def test_kl_and_entropy_switch(mask_by_update):
    groups = make_groups(num_questions=3, G=4)
    algo = algorithm(1, mask_by_update)
    samples = samples_of(groups, algo, seed=4)
    normalizers = loss_normalizers(samples, algo)
    batch, logprobs, entropy, ref = forward(TinyLM(), samples)
    logprobs, entropy = logprobs.detach().requires_grad_(), entropy.detach().requires_grad_()
    loss, metrics = loss_of(batch, logprobs, entropy, ref, batch.update_mask, normalizers)
    loss.backward()

    update = batch.update_mask
    every = torch.ones_like(update)
    # Off: samples outside the subset still get KL and entropy gradient; on: they get no gradient at all.
    covered = update if mask_by_update else every
    assert torch.equal(logprobs.grad.abs().sum(dim=1) > 0, covered)
    assert torch.equal(entropy.grad.abs().sum(dim=1) > 0, covered)

    all_tokens, update_tokens = float(batch.loss_mask.sum()), float(batch.loss_mask[update].sum())
    assert normalizers.policy == update_tokens
    assert normalizers.regularizer == (update_tokens if mask_by_update else all_tokens)

    # The KL and entropy values: over the rows they cover, as if only those rows were in the batch.
    rows = covered
    alone_mask = batch.loss_mask[rows].bool()
    kl_alone = grpo.kl_penalty(logprobs.detach()[rows], ref[rows], "k3")[alone_mask].mean()
    torch.testing.assert_close(metrics["kl"], kl_alone.double())
    torch.testing.assert_close(metrics["entropy"], entropy.detach()[rows][alone_mask].mean().double())


def test_learner_passes_the_switch_to_the_loss():
    # The learner's own micro-batch loss, on a stand-in for its model: the switch must reach grpo_loss,
    # whose normalizers (counted under the switch) would otherwise be refused.
    samples = samples_of(make_groups(num_questions=2, G=4), algorithm(1), seed=3)
    batch = collate(samples, pad_id=0)
    results = {}
    for mask_by_update in (False, True):
        algo = AlgorithmConfig(update_subset=1, mask_kl_and_entropy_by_update=mask_by_update, entropy_coef=0.01)
        loss, metrics = update_steps.policy_loss(TinyLM(), None, batch, loss_normalizers(samples, algo), algo,
                                                 temperature=1.0, fixed=None, timings={})
        entropy = entropy_from_logits(TinyLM()(batch.input_ids).logits)
        rows = batch.update_mask if mask_by_update else torch.ones_like(batch.update_mask)
        expected = entropy[rows][batch.loss_mask[rows].bool()].mean()
        torch.testing.assert_close(metrics["entropy"], expected.double())
        results[mask_by_update] = loss.detach()
    assert not torch.equal(results[False], results[True])


# ---------------------------------------------------------------- config


def test_config_defaults_update_every_trajectory():
    cfg = load_config()
    assert cfg.algorithm.update_subset is None and cfg.algorithm.mask_kl_and_entropy_by_update is False
    cfg = load_config(None, ["rollout.group_size=4", "algorithm.update_subset=4",
                             "algorithm.mask_kl_and_entropy_by_update=true"])
    assert cfg.algorithm.update_subset == 4 and cfg.algorithm.mask_kl_and_entropy_by_update is True


def test_config_rejects_a_subset_larger_than_the_group():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["rollout.group_size=4", "algorithm.update_subset=5"])
    message = str(info.value)
    assert "algorithm.update_subset = 5" in message and "rollout.group_size = 4" in message
    assert "1..4" in message


@pytest.mark.parametrize("bad", ["0", "-2"])
def test_config_rejects_a_subset_below_one(bad):
    with pytest.raises(ConfigError, match=r"'algorithm\.update_subset'.*greater than or equal to 1"):
        load_config(None, [f"algorithm.update_subset={bad}"])


def test_config_rejects_a_non_integer_subset_and_names_typos():
    with pytest.raises(ConfigError, match=r"'algorithm\.update_subset'"):
        load_config(None, ["algorithm.update_subset=half"])
    with pytest.raises(ConfigError, match=r"did you mean 'algorithm\.update_subset'"):
        load_config(None, ["algorithm.update_subsets=2"])
