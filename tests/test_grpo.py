"""The GRPO/SFT loss math against hand-computed values, naive loops and split batches (CPU, fast)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from innerloop.learners.grpo import (
    ADVANTAGE_SCALES,
    AGGREGATIONS,
    K3_LOG_RATIO_BOUND,
    KL_ESTIMATORS,
    LossNormalizers,
    aggregate,
    clipped_surrogate,
    count_units,
    global_normalizer,
    group_advantages,
    grpo_loss,
    kl_penalty,
    loss_normalizers,
    sft_nll_loss,
    sum_metrics,
    update_subset_mask,
)
from innerloop.distributed.records import PolicySums
from innerloop.learners.logprobs import entropy_from_logits, token_logprobs

# ---------------------------------------------------------------- fixtures


def logged(metrics) -> dict[str, float]:
    """grpo_loss's metrics as the learner logs them (PolicySums.record); the learner adds the sampler gap."""
    return PolicySums(**{k: float(v) for k, v in metrics.items()}, sampler_gap_sum=0.0).record()


def make_batch(seed: int = 0, dtype=torch.float64):
    """6 samples (3 groups of 2), unequal prompt and completion lengths, right padding."""
    g = torch.Generator().manual_seed(seed)
    B, T, V = 6, 9, 7
    prompt_lens = [2, 3, 1, 2, 4, 3]
    completion_lens = [5, 2, 7, 1, 3, 6]
    input_ids = torch.randint(0, V, (B, T), generator=g)
    loss_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
        loss_mask[b, p : p + c] = True
    logits = torch.randn(B, T, V, generator=g, dtype=dtype)
    old_logprobs = torch.where(loss_mask, -torch.rand(B, T, generator=g, dtype=dtype) * 2, 0.0)
    ref_logprobs = torch.where(loss_mask, -torch.rand(B, T, generator=g, dtype=dtype) * 2, 0.0)
    advantages = torch.randn(B, generator=g, dtype=dtype)
    return dict(input_ids=input_ids, loss_mask=loss_mask, logits=logits, old_logprobs=old_logprobs,
                ref_logprobs=ref_logprobs, advantages=advantages)


def run_loss(batch, logits, rows, normalizers, update_mask=None, **kw):
    """grpo_loss on the sample rows `rows` of the batch, logits taken from the (shared) leaf."""
    lg = logits[rows]
    logprobs = token_logprobs(lg, batch["input_ids"][rows])
    kw = dict(dict(clip_low=0.2, clip_high=0.28, kl_coef=0.1, kl_estimator="k3",
                   entropy_coef=0.01), **kw)
    return grpo_loss(
        logprobs, batch["old_logprobs"][rows], batch["advantages"][rows], batch["loss_mask"][rows],
        None if update_mask is None else update_mask[rows], normalizers,
        aggregation=normalizers.aggregation,
        mask_kl_and_entropy_by_update=normalizers.mask_kl_and_entropy_by_update,
        ref_logprobs=batch["ref_logprobs"][rows], entropy=entropy_from_logits(lg), **kw,
    )


# ---------------------------------------------------------------- advantages


def test_group_advantages_std_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    # group 0: mean .5, sample std sqrt(1/3); group 1: mean .25, sample std .5
    s = 0.5 / math.sqrt(1 / 3)
    expected = torch.tensor([[s, -s, -s, s], [-0.5, -0.5, -0.5, 1.5]])
    torch.testing.assert_close(group_advantages(rewards, "std", eps=0.0), expected)
    torch.testing.assert_close(group_advantages(rewards, "std"), expected, atol=1e-5, rtol=0)


def test_group_advantages_none_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [-0.25, -0.25, -0.25, 0.75]])
    torch.testing.assert_close(group_advantages(rewards, "none"), expected)


@pytest.mark.parametrize("scale", sorted(ADVANTAGE_SCALES))
def test_zero_variance_group_gives_exact_zeros(scale):
    rewards = torch.tensor([[0.1, 0.1, 0.1], [-0.5, -0.5, -0.5], [1.0, 0.0, 1.0]])
    adv = group_advantages(rewards, scale, eps=1e-30)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[:2], torch.zeros(2, 3))
    assert (adv[2] != 0).all()
    assert torch.equal(group_advantages(torch.tensor([[0.3], [1.0]]), scale), torch.zeros(2, 1))  # G = 1


def test_group_advantages_loop_matches_vectorized():
    rewards = torch.randn(5, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = 1e-6
    for scale in ("std", "none"):
        vec = group_advantages(rewards, scale, eps=eps)
        for i, row in enumerate(rewards.tolist()):
            mean = statistics.fmean(row)
            denom = statistics.stdev(row) + eps if scale == "std" else 1.0
            torch.testing.assert_close(vec[i], torch.tensor([(r - mean) / denom for r in row], dtype=torch.float64))


def test_unknown_names_say_the_choices():
    with pytest.raises(ValueError, match="none"):
        group_advantages(torch.zeros(1, 2), "mean")
    with pytest.raises(ValueError, match="k3"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")
    with pytest.raises(ValueError, match="sequence"):
        global_normalizer(torch.ones(1, 1), "tokens")


# ---------------------------------------------------------------- update subset


def test_update_subset_mask_is_m_per_group_and_seeded():
    a = update_subset_mask(5, 8, 3, torch.Generator().manual_seed(7))
    b = update_subset_mask(5, 8, 3, torch.Generator().manual_seed(7))
    assert a.shape == (40,) and a.dtype == torch.bool
    assert torch.equal(a, b)
    assert a.view(5, 8).sum(dim=1).tolist() == [3] * 5
    assert update_subset_mask(2, 4, 4, torch.Generator()).all()
    with pytest.raises(ValueError):
        update_subset_mask(2, 4, 0, torch.Generator())


# ---------------------------------------------------------------- log-probs and entropy


def naive_logprobs(logits, input_ids):
    B, T, _ = logits.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(1, T):
            out[b, t] = torch.log_softmax(logits[b, t - 1].double(), dim=-1)[input_ids[b, t]]
    return out


def naive_entropy(logits):
    B, T, _ = logits.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(1, T):
            p = torch.softmax(logits[b, t - 1].double(), dim=-1)
            out[b, t] = -(p * p.log()).sum()
    return out


@pytest.mark.parametrize("chunk_tokens", [1, 3, 8, 1000])
def test_token_logprobs_match_naive_loop(chunk_tokens):
    batch = make_batch(dtype=torch.float32)
    got = token_logprobs(batch["logits"], batch["input_ids"], chunk_tokens=chunk_tokens)
    assert got.dtype == torch.float32 and got.shape == batch["input_ids"].shape
    assert torch.equal(got[:, 0], torch.zeros(6))
    torch.testing.assert_close(got.double(), naive_logprobs(batch["logits"], batch["input_ids"]), atol=1e-5, rtol=0)


def test_token_logprobs_bf16_and_temperature():
    batch = make_batch(dtype=torch.float32)
    logits = batch["logits"].bfloat16().requires_grad_()
    got = token_logprobs(logits, batch["input_ids"], chunk_tokens=4)
    # The same bf16 values, widened: only fp32 arithmetic error separates them.
    torch.testing.assert_close(got.double(), naive_logprobs(logits.detach(), batch["input_ids"]), atol=1e-5, rtol=0)
    got.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad).all()
    hot = token_logprobs(batch["logits"], batch["input_ids"], temperature=0.7)
    torch.testing.assert_close(hot.double(), naive_logprobs(batch["logits"] / 0.7, batch["input_ids"]), atol=1e-5, rtol=0)


def test_token_logprobs_and_entropy_gradcheck():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.randint(0, 5, (2, 4), generator=g)
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, ids, temperature=0.8, chunk_tokens=2), (logits,))
    assert torch.autograd.gradcheck(lambda x: entropy_from_logits(x, temperature=1.3, chunk_tokens=5), (logits,))


@pytest.mark.parametrize("chunk_tokens", [2, 1000])
def test_entropy_matches_naive_loop(chunk_tokens):
    batch = make_batch(dtype=torch.float32)
    got = entropy_from_logits(batch["logits"], chunk_tokens=chunk_tokens)
    torch.testing.assert_close(got.double(), naive_entropy(batch["logits"]), atol=1e-5, rtol=0)
    assert torch.equal(got[:, 0], torch.zeros(6))


def test_entropy_with_minus_inf_logits_is_finite():
    logits = torch.tensor([[[0.0, 0.0, -math.inf, -math.inf]] * 3], requires_grad=True)
    ent = entropy_from_logits(logits)
    torch.testing.assert_close(ent[0, 1:], torch.full((2,), math.log(2)))
    ent.sum().backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- clipping


@pytest.mark.parametrize("adv", [1.5, -1.5])
def test_clipping_engages_exactly_outside_the_range(adv):
    clip_low, clip_high = 0.2, 0.28
    ratios = torch.tensor([0.5, 0.79, 0.81, 1.0, 1.27, 1.29, 2.0], dtype=torch.float64)
    logprobs = ratios.log().unsqueeze(0).clone().requires_grad_()
    per_token, clipped = clipped_surrogate(logprobs, torch.zeros_like(logprobs), torch.tensor([adv], dtype=torch.float64),
                                           clip_low, clip_high)
    expected = ratios > 1 + clip_high if adv > 0 else ratios < 1 - clip_low
    assert torch.equal(clipped[0], expected)
    bounded = ratios.clamp(1 - clip_low, 1 + clip_high)
    torch.testing.assert_close(per_token[0], -torch.minimum(ratios * adv, bounded * adv))
    per_token.sum().backward()
    grad = logprobs.grad[0]
    assert torch.equal(grad[expected], torch.zeros(int(expected.sum()), dtype=torch.float64))
    torch.testing.assert_close(grad[~expected], -adv * ratios[~expected])  # d(-r A)/d logp = -r A


# ---------------------------------------------------------------- KL


def test_kl_estimators_zero_at_equality_and_hand_values():
    lp = torch.tensor([-0.3, -2.0, -7.5])
    for name in KL_ESTIMATORS:
        assert torch.equal(kl_penalty(lp, lp, name), torch.zeros(3))
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])  # ref - logp = -log 2
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([math.log(2)]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([0.5 * math.log(2) ** 2]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([0.5 + math.log(2) - 1]))


def test_k3_beyond_its_bound_stays_finite_and_keeps_its_gradient():
    # Far below the reference (r = ref - logp = 100): the tangent beyond the bound, gradient -(e^B - 1).
    # Far above it (r = -100): no bound needed, the gradient is 1 - e^r ~ 1 (a value clamp would zero it).
    logp = torch.tensor([-100.0, 0.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([0.0, -100.0], dtype=torch.float64)
    k3 = kl_penalty(logp, ref, "k3")
    assert torch.isfinite(k3).all()
    bound = K3_LOG_RATIO_BOUND
    torch.testing.assert_close(k3[0], torch.tensor(math.exp(bound) * (1 + 100 - bound) - 101, dtype=torch.float64))
    torch.testing.assert_close(k3[1], torch.tensor(math.exp(-100) + 99, dtype=torch.float64))
    k3.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([1 - math.exp(bound), 1 - math.exp(-100)], dtype=torch.float64))
    # Inside the bound the tangent form is e^r - r - 1 exactly, with its gradient 1 - e^r.
    inside = torch.tensor([-0.7], dtype=torch.float64, requires_grad=True)
    kl_penalty(inside, torch.tensor([-3.0], dtype=torch.float64), "k3").sum().backward()
    torch.testing.assert_close(inside.grad, torch.tensor([1 - math.exp(-3.0 + 0.7)], dtype=torch.float64))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_give_the_gradient_they_are_documented_by(estimator):
    # Exact expectation over a categorical policy: sum_x pi(x) * d estimator(log pi(x), log ref(x)) / d theta.
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    log_ref = torch.log_softmax(torch.randn(7, generator=g, dtype=torch.float64), dim=0)
    log_pi = torch.log_softmax(theta, dim=0)
    per_token = kl_penalty(log_pi, log_ref, estimator)
    (expected_grad,) = torch.autograd.grad((log_pi.exp().detach() * per_token).sum(), theta)
    log_pi = torch.log_softmax(theta, dim=0)
    pi = log_pi.exp()
    truth = {"k1": 0.0 * theta.sum(),  # its expected gradient is zero
             "k2": (pi * (log_pi - log_ref)).sum(),  # KL(pi || ref)
             "k3": (log_ref.exp() * (log_ref - log_pi)).sum()}[estimator]  # KL(ref || pi)
    (true_grad,) = torch.autograd.grad(truth, theta)
    torch.testing.assert_close(expected_grad, true_grad)
    if estimator != "k1":
        assert true_grad.abs().sum() > 1e-3


# ---------------------------------------------------------------- aggregation and split batches


def test_sequence_aggregation_loop_matches_vectorized():
    batch = make_batch()
    values, mask = torch.randn(6, 9, dtype=torch.float64), batch["loss_mask"]
    loop = sum(values[b][mask[b]].mean() for b in range(6)) / 6
    torch.testing.assert_close(aggregate(values, mask, global_normalizer(mask, "sequence"), "sequence"), loop)
    torch.testing.assert_close(aggregate(values, mask, global_normalizer(mask, "token"), "token"), values[mask].mean())


def test_empty_sequences_do_not_count_and_empty_batch_is_zero():
    mask = torch.tensor([[0, 1, 1], [0, 0, 0]])
    assert count_units(mask, "sequence") == 1.0 and count_units(mask, "token") == 2.0
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert global_normalizer(empty, "token") == 1.0
    assert aggregate(torch.ones(2, 3), empty, 1.0, "token") == 0.0


@pytest.mark.parametrize("mask_by_update", [False, True])
@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_two_half_batches_sum_to_full_loss_and_gradient(aggregation, mask_by_update):
    batch = make_batch()
    update = torch.tensor([True, False, True, True, False, True])
    normalizers = loss_normalizers(batch["loss_mask"], update, aggregation, mask_by_update)

    full_logits = batch["logits"].clone().requires_grad_()
    full_loss, full_metrics = run_loss(batch, full_logits, slice(0, 6), normalizers, update)
    full_loss.backward()

    split_logits = batch["logits"].clone().requires_grad_()
    pieces, total = [], 0.0
    for rows in (slice(0, 2), slice(2, 6)):  # unequal "ranks"; each uses the global normalizers
        loss, metrics = run_loss(batch, split_logits, rows, normalizers, update)
        loss.backward()
        pieces.append(metrics)
        total = total + loss.detach()

    torch.testing.assert_close(total, full_loss.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(split_logits.grad, full_logits.grad, atol=1e-12, rtol=0)
    summed = logged(sum_metrics(pieces))
    for key, value in logged(full_metrics).items():
        assert summed[key] == pytest.approx(value, abs=1e-12), key


def test_prompt_and_padding_positions_get_zero_gradient():
    batch = make_batch()
    normalizers = loss_normalizers(batch["loss_mask"], None, "token")
    logits = batch["logits"].clone().requires_grad_()
    loss, _ = run_loss(batch, logits, slice(0, 6), normalizers)
    loss.backward()
    # logits[:, t] predict token t+1: they carry gradient only where loss_mask[:, t+1] is set.
    predicts_loss_token = torch.zeros_like(batch["loss_mask"])
    predicts_loss_token[:, :-1] = batch["loss_mask"][:, 1:]
    assert (logits.grad[~predicts_loss_token] == 0).all()
    assert (logits.grad[predicts_loss_token].abs().sum(-1) > 0).all()


def test_arbitrary_old_logprobs_outside_the_mask_stay_harmless():
    batch = make_batch()
    normalizers = loss_normalizers(batch["loss_mask"], None, "token")
    logits = batch["logits"].clone().requires_grad_()
    clean, _ = run_loss(batch, logits, slice(0, 6), normalizers)
    batch["old_logprobs"] = torch.where(batch["loss_mask"], batch["old_logprobs"], -1e4)  # exp(+1e4) = inf
    batch["ref_logprobs"] = torch.where(batch["loss_mask"], batch["ref_logprobs"], 1e4)
    dirty, _ = run_loss(batch, logits, slice(0, 6), normalizers)
    dirty.backward()
    assert torch.equal(clean, dirty) and torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- update subset in the loss


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_update_mask_of_all_g_equals_no_mask_exactly(aggregation):
    batch = make_batch()
    all_g = update_subset_mask(3, 2, 2, torch.Generator().manual_seed(0))
    results = []
    for update in (None, all_g):
        logits = batch["logits"].clone().requires_grad_()
        loss, metrics = run_loss(batch, logits, slice(0, 6), loss_normalizers(batch["loss_mask"], update, aggregation), update)
        loss.backward()
        results.append((loss.detach(), logits.grad, metrics))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert results[0][2] == results[1][2]


@pytest.mark.parametrize("mask_by_update", [False, True])
def test_m_equal_one_gives_one_pg_gradient_per_group(mask_by_update):
    batch = make_batch()
    num_groups, G = 2, 3
    update = update_subset_mask(num_groups, G, 1, torch.Generator().manual_seed(5))
    rewards = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.25]])
    advantages = group_advantages(rewards, "std").reshape(-1).double()
    logprobs = token_logprobs(batch["logits"], batch["input_ids"]).requires_grad_()
    normalizers = loss_normalizers(batch["loss_mask"], update, "token", mask_by_update)
    common = dict(clip_low=0.2, clip_high=0.2, aggregation="token", mask_kl_and_entropy_by_update=mask_by_update)

    on_policy = logprobs.detach()  # ratio 1: nothing clipped, so every update sample must get a gradient
    pg, _ = grpo_loss(logprobs, on_policy, advantages, batch["loss_mask"], update, normalizers, **common)
    (grad,) = torch.autograd.grad(pg, logprobs)
    has_grad = grad.abs().sum(dim=1) > 0  # [B]
    assert torch.equal(has_grad, update)
    assert has_grad.view(num_groups, G).sum(dim=1).tolist() == [1] * num_groups

    kl, _ = grpo_loss(logprobs, on_policy, torch.zeros(6, dtype=torch.float64), batch["loss_mask"], update,
                      normalizers, kl_coef=1.0, kl_estimator="k1", ref_logprobs=batch["ref_logprobs"] - 1.0, **common)
    (grad,) = torch.autograd.grad(kl, logprobs)
    expected = update if mask_by_update else torch.ones(6, dtype=torch.bool)  # KL covers all G unless masked
    assert torch.equal(grad.abs().sum(dim=1) > 0, expected)


def test_normalizers_must_match_the_loss_settings():
    batch = make_batch()
    logprobs = torch.zeros(6, 9, dtype=torch.float64)
    wrong = loss_normalizers(batch["loss_mask"], None, "sequence")
    with pytest.raises(ValueError, match="loss_normalizers"):
        grpo_loss(logprobs, logprobs, batch["advantages"], batch["loss_mask"], None, wrong,
                  clip_low=0.2, clip_high=0.2, aggregation="token")
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logprobs, logprobs, batch["advantages"], batch["loss_mask"], None,
                  LossNormalizers("token", False, 1.0, 1.0), clip_low=0.2, clip_high=0.2, aggregation="token", kl_coef=0.1)


def test_on_policy_loss_is_minus_mean_advantage_per_token():
    batch = make_batch()
    lp = token_logprobs(batch["logits"], batch["input_ids"])
    mask = batch["loss_mask"]
    loss, metrics = grpo_loss(lp, lp.detach(), batch["advantages"], mask, None, loss_normalizers(mask, None, "token"),
                              clip_low=0.2, clip_high=0.2, aggregation="token")
    expected = -(batch["advantages"].unsqueeze(1).expand_as(mask)[mask]).mean()
    torch.testing.assert_close(loss, expected)
    assert logged(metrics)["clip_fraction"] == 0.0


# ---------------------------------------------------------------- SFT


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_sft_nll_matches_hand_form_and_splits(aggregation):
    batch = make_batch()
    mask = batch["loss_mask"]
    normalizer = global_normalizer(mask, aggregation)
    logits = batch["logits"].clone().requires_grad_()
    full, metrics = sft_nll_loss(token_logprobs(logits, batch["input_ids"]), mask, normalizer, aggregation)
    nll = -naive_logprobs(batch["logits"], batch["input_ids"])
    if aggregation == "token":
        expected = nll[mask].mean()
    else:
        expected = torch.stack([nll[b][mask[b]].mean() for b in range(6)]).mean()
    torch.testing.assert_close(full, expected)
    assert float(metrics["tokens"]) == float(mask.sum())
    halves = sum(
        sft_nll_loss(token_logprobs(logits[r], batch["input_ids"][r]), mask[r], normalizer, aggregation)[0]
        for r in (slice(0, 3), slice(3, 6))
    )
    torch.testing.assert_close(halves, full, atol=1e-12, rtol=0)
