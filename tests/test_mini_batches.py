"""Several optimizer steps per batch (algorithm.mini_batches x epochs), the sampler correction and
token-budget micro-batches, through the learner's own update on a stand-in engine that really steps
(CPU, a tiny float64 Llama, no DeepSpeed)."""

from __future__ import annotations

import math

import pytest
import torch

from innerloop.distributed.config import AlgorithmConfig, LearnerConfig
from innerloop.distributed.records import TrainingSample
from innerloop.distributed.run.samples import loss_normalizers
from innerloop.learners import grpo, update_steps
from innerloop.learners.batching import collate, micro_batches, shard_for_rank
from innerloop.learners.forward import first_predicting_position, left_pad
from innerloop.learners.learner import Learner
from innerloop.learners.logprobs import token_logprobs
from tests.test_sft_data import StandInEngine, tiny_llama

V = 97


class SteppingEngine(StandInEngine):
    """The stand-in engine with a real optimizer: SGD steps at each accumulation boundary, then the
    gradients are kept (`step_grads`) and zeroed, as DeepSpeed's engine does."""

    def __init__(self, model, micro_batch_size: int, world_size: int = 1, lr: float = 0.0):
        super().__init__(model, micro_batch_size, world_size)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        self.step_grads: list[list[torch.Tensor]] = []
        self._boundary = False

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        super().set_gradient_accumulation_boundary(is_boundary)
        self._boundary = is_boundary

    def step(self) -> None:
        super().step()
        if self._boundary:
            self.step_grads.append([p.grad.detach().clone() for p in self.model.parameters()])
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=False)


def learner_for(model, algorithm: AlgorithmConfig, lr: float = 0.0, micro_batch_size: int = 2,
                max_tokens: int | None = None, packing: bool = False) -> Learner:
    learner = Learner.__new__(Learner)  # no process group, no DeepSpeed: only what an update reads
    learner.rank, learner.world_size, learner._pad_id, learner._reference = 0, 1, 0, None
    learner._cfg = LearnerConfig(micro_batch_size=micro_batch_size, max_tokens_per_micro_batch=max_tokens,
                                 packing=packing)
    learner._algo, learner._temperature = algorithm, 0.7
    learner.engine = SteppingEngine(model, micro_batch_size, lr=lr)
    return learner


def recording_steps(learner: Learner) -> list[update_steps.StepResult]:
    """Every optimizer step's own result, as the update produced them."""
    steps, real = [], learner._step

    def spy(*args, **kwargs):
        steps.append(real(*args, **kwargs))
        return steps[-1]

    learner._step = spy
    return steps


def samples_of(count: int = 8, seed: int = 1, sampler_logprob: float = -1.0) -> list[TrainingSample]:
    """Unequal lengths, advantages of both signs, the sampler's log-prob of every completion token."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(count):
        prompt, completion = 3 + (2 * i) % 5, 2 + (3 * i) % 4
        ids = tuple(torch.randint(1, V, (prompt + completion,), generator=g).tolist())
        samples.append(TrainingSample.of_completion(ids[:prompt], ids[prompt:], (-1.0) ** i * (1 + i / 4),
                                                    (sampler_logprob,) * completion))
    return samples


def previous_update_gradient(model, samples, normalizers, algorithm, micro_batch_size: int) -> list[torch.Tensor]:
    """The update as it was before mini-batches: one step, old = current detached, micro-batches of the
    length-sorted shard, each loss multiplied back by the micro-batch count."""
    chunks = micro_batches(shard_for_rank(samples, 0, 1), micro_batch_size)
    for chunk in chunks:
        batch = collate(chunk, 0)
        start = first_predicting_position(batch.loss_mask)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       logits_to_keep=batch.input_ids.shape[1] - start).logits
        logprobs = left_pad(token_logprobs(logits, batch.input_ids[:, start:], temperature=0.7), start)
        loss, _ = grpo.grpo_loss(logprobs, logprobs.detach(), batch.advantages, batch.loss_mask, batch.update_mask,
                                 normalizers, clip_low=algorithm.clip_low, clip_high=algorithm.clip_high,
                                 aggregation=algorithm.aggregation)
        # Handed to DeepSpeed times the micro-batch count, which its backward divides back out.
        (loss * len(chunks) / len(chunks)).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------- the default is the old update


def test_one_mini_batch_one_epoch_is_bitwise_the_update_before_mini_batches():
    samples, algorithm = samples_of(), AlgorithmConfig()
    assert (algorithm.mini_batches, algorithm.epochs) == (1, 1)
    normalizers = loss_normalizers(samples, algorithm)
    learner = learner_for(tiny_llama(), algorithm)
    metrics = learner.update(samples, normalizers)
    expected = previous_update_gradient(tiny_llama(), samples, normalizers, algorithm, micro_batch_size=2)
    (got,) = learner.engine.step_grads
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    assert metrics.sums.clipped_tokens == 0 and metrics.sums.tokens == sum(sum(s.loss_mask) for s in samples)


# ---------------------------------------------------------------- several steps per batch


def test_mini_batch_gradients_average_to_the_full_batch_gradient_and_losses_sum_to_its_loss():
    samples = samples_of()
    full_algo, split_algo = AlgorithmConfig(), AlgorithmConfig(mini_batches=2)
    normalizers = loss_normalizers(samples, full_algo)  # the whole batch's, whatever the split
    full, split = learner_for(tiny_llama(), full_algo), learner_for(tiny_llama(), split_algo)  # lr 0: weights stay
    full_metrics, split_metrics = full.update(samples, normalizers), split.update(samples, normalizers)
    assert len(split.engine.step_grads) == 2
    for name_index, want in enumerate(full.engine.step_grads[0]):
        mean = sum(step[name_index] for step in split.engine.step_grads) / 2  # each step's is scaled by 2
        torch.testing.assert_close(mean, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(split_metrics.sums.loss, full_metrics.sums.loss, rtol=1e-9, atol=0)
    assert split_metrics.sums.tokens == full_metrics.sums.tokens


def test_clipping_engages_from_the_second_mini_batch_on():
    samples = samples_of()
    algorithm = AlgorithmConfig(mini_batches=2, clip_low=0.01, clip_high=0.01)
    learner = learner_for(tiny_llama(), algorithm, lr=3.0)
    steps = recording_steps(learner)
    metrics = learner.update(samples, loss_normalizers(samples, algorithm))
    first, second = (s.metrics for s in steps)
    assert float(first["clipped_tokens"]) == 0  # old log-probs are these very weights': ratio 1
    assert float(second["clipped_tokens"]) > 0  # the first step moved the policy the old log-probs froze
    assert metrics.sums.clipped_tokens == float(second["clipped_tokens"])

    # With one step per batch the ratio is always 1: nothing can clip, however large the step.
    plain = learner_for(tiny_llama(), AlgorithmConfig(clip_low=0.01, clip_high=0.01), lr=3.0)
    assert plain.update(samples, loss_normalizers(samples, algorithm)).sums.clipped_tokens == 0


def test_epochs_repeat_the_mini_batches_with_the_same_old_logprobs_and_advantages():
    samples = samples_of()
    algorithm = AlgorithmConfig(mini_batches=2, epochs=2, clip_low=0.01, clip_high=0.01)
    learner = learner_for(tiny_llama(), algorithm, lr=3.0)
    steps = recording_steps(learner)
    metrics = learner.update(samples, loss_normalizers(samples, algorithm))
    assert len(steps) == algorithm.optimizer_steps == 4
    # Each epoch covers the batch once: the update's counts are one batch's, its losses the mean epoch's.
    assert metrics.sums.tokens == sum(sum(s.loss_mask) for s in samples)
    assert float(steps[2].metrics["clipped_tokens"]) > 0  # epoch 2, mini-batch 1: the weights moved twice
    assert metrics.skipped is False and metrics.learning_rate == steps[0].learning_rate


def test_mini_batches_are_consecutive_equal_parts_and_refuse_a_ragged_split():
    from innerloop.learners.batching import split_mini_batches

    samples = samples_of(8)
    parts = split_mini_batches(samples, 4)
    assert [len(p) for p in parts] == [2] * 4 and [s for p in parts for s in p] == samples
    with pytest.raises(ValueError, match="3 equal mini-batches"):
        split_mini_batches(samples, 3)


# ---------------------------------------------------------------- the sampler correction


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_sampler_correction_weighs_fresh_tokens_and_counts_what_the_cap_bounded(mode):
    # The sampler's log-probs (-8) sit far below the random model's (~ -log 97): ratios way over the cap.
    samples = samples_of(sampler_logprob=-8.0)
    algorithm = AlgorithmConfig(sampler_correction=mode, tis_cap=2.0)
    metrics = learner_for(tiny_llama(), algorithm).update(samples, loss_normalizers(samples, algorithm))
    record = metrics.sums.record()
    assert record["is_bounded_fraction"] > 0
    if mode.endswith("truncate"):
        assert 0 < record["is_weight_mean"] <= 2.0
    plain = learner_for(tiny_llama(), AlgorithmConfig()).update(samples, loss_normalizers(samples, AlgorithmConfig()))
    assert plain.sums.record()["is_weight_mean"] == 1.0 and plain.sums.record()["is_bounded_fraction"] == 0.0


def test_sampler_correction_weights_by_hand():
    from innerloop.learners.off_policy import sampler_correction_weights

    old = torch.tensor([[0.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    sampler = torch.tensor([[0.0, -2.0, -1.0, -1.5]], dtype=torch.float64)  # rho = e, 1, e^0.5
    mask = torch.tensor([[0, 1, 1, 1]])
    e = math.e
    cases = {"token_truncate": [1, 2, 1, e ** 0.5], "token_mask": [1, 0, 1, e ** 0.5],
             "sequence_truncate": [1, 2, 2, 2], "sequence_mask": [1, 0, 0, 0]}  # sequence rho = e^1.5
    for mode, want in cases.items():
        weights, bounded = sampler_correction_weights(old, sampler, mask, mode, cap=2.0)
        torch.testing.assert_close(weights, torch.tensor([want], dtype=torch.float64), msg=mode)
        assert bounded.tolist() == ([[False, True, False, False]] if mode.startswith("token") else
                                    [[False, True, True, True]]), mode
    with pytest.raises(ValueError, match="choose one of"):
        sampler_correction_weights(old, sampler, mask, "sequence_clip", cap=2.0)


# ---------------------------------------------------------------- config


def test_config_names_the_mini_batch_split_that_does_not_fit():
    from innerloop.distributed.config import ConfigError
    from innerloop.distributed.config_load import load_config

    cfg = load_config(None, ["algorithm.mini_batches=4", "algorithm.epochs=2"])  # 64 samples: 4 x 16
    assert cfg.algorithm.optimizer_steps == 8
    with pytest.raises(ConfigError, match=r"algorithm\.mini_batches = 3 .*divisor of 64"):
        load_config(None, ["algorithm.mini_batches=3"])
    with pytest.raises(ConfigError, match=r"a mini-batch .* = 8 samples .*learner.micro_batch_size = 16"):
        load_config(None, ["algorithm.mini_batches=8"])
    # Under a token budget a mini-batch needs only to divide among the ranks.
    assert load_config(None, ["algorithm.mini_batches=8", "learner.max_tokens_per_micro_batch=4096"])


@pytest.mark.parametrize("weighing", [["rollout.asynchronous=true"], ["algorithm.sampler_correction=token_mask"]])
def test_top_p_below_one_is_refused_where_the_samplers_logprobs_weigh_the_loss(weighing):
    from innerloop.distributed.config import ConfigError
    from innerloop.distributed.config_load import load_config

    assert load_config(None, ["rollout.top_p=0.9"]).rollout.top_p == 0.9  # on-policy only: allowed
    with pytest.raises(ConfigError, match=r"rollout\.top_p = 0\.9 .*nucleus.*set rollout\.top_p=1\.0"):
        load_config(None, ["rollout.top_p=0.9", *weighing])


# ---------------------------------------------------------------- token-budget micro-batches


def budget_ranks(model, world_size: int, algorithm: AlgorithmConfig, max_tokens: int | None,
                 packing: bool = False) -> list[Learner]:
    ranks = []
    for rank in range(world_size):
        learner = learner_for(model, algorithm, max_tokens=max_tokens, packing=packing)
        learner.rank, learner.world_size = rank, world_size
        learner.engine = SteppingEngine(model, 2, world_size)  # ranks share one model: gradients add up
        ranks.append(learner)
    return ranks


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("max_tokens", [1, 20, 40, 10_000])
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("mini_batches", [1, 2])
def test_the_gradient_is_the_same_however_a_token_budget_cuts_the_batch(max_tokens, world_size, mini_batches,
                                                                        packing):
    samples = samples_of(8)
    algorithm = AlgorithmConfig(mini_batches=mini_batches, kl_coef=0.1, entropy_coef=0.01, aggregation="sequence")
    normalizers = loss_normalizers(samples, algorithm)
    fixed_model, budget_model = tiny_llama(), tiny_llama()
    fixed = budget_ranks(fixed_model, world_size, algorithm, None)
    budget = budget_ranks(budget_model, world_size, algorithm, max_tokens, packing)
    for learner in fixed + budget:
        learner._reference = tiny_llama()  # a KL term, so the reference's forward is split and packed too
        torch.manual_seed(5)
        with torch.no_grad():
            for param in learner._reference.parameters():
                param.add_(0.01 * torch.randn_like(param))
    fixed_metrics = [learner.update(samples, normalizers) for learner in fixed]
    budget_metrics = [learner.update(samples, normalizers) for learner in budget]
    counts = [len(learner._plan(samples, mini_batches)[0]) for learner in budget]
    assert len(set(counts)) == 1  # every rank runs as many micro-batches as the others
    for got, want in zip(budget_model.parameters(), fixed_model.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-12)
    for got, want in zip(budget_metrics, fixed_metrics):
        for key in ("loss", "kl", "entropy", "tokens"):
            torch.testing.assert_close(getattr(got.sums, key), getattr(want.sums, key), rtol=1e-9, atol=1e-12)
    assert fixed_metrics[0].sums.kl > 0


def test_a_token_budget_packs_length_sorted_samples_and_a_long_one_goes_alone():
    from innerloop.learners.batching import split_to_count, token_budget_micro_batches

    def sample(length):
        return TrainingSample.of_completion((1,), (2,) * (length - 1), 1.0)

    samples = [sample(n) for n in (2, 3, 3, 4, 9)]
    chunks = token_budget_micro_batches(samples, max_tokens=9)
    assert [[len(s.input_ids) for s in c] for c in chunks] == [[2, 3, 3], [4], [9]]  # 3 x 3 = 9 fits; 4 x 4 not
    packed = token_budget_micro_batches(samples, max_tokens=9, packed=True)  # real tokens: 2 + 3 + 3 = 8
    assert [[len(s.input_ids) for s in c] for c in packed] == [[2, 3, 3], [4], [9]]
    assert [len(c) for c in token_budget_micro_batches(samples, max_tokens=12, packed=True)] == [4, 1]
    assert [len(c) for c in split_to_count(chunks, 4)] == [1, 2, 1, 1]
    with pytest.raises(ValueError, match="cannot fill 6 micro-batches"):
        split_to_count(chunks, 6)
