"""SFT data and the learner's SFT step on the CPU: the trajectory file, worked solutions as
trajectories, the balanced k-per-question set, tokenized samples, and `Learner.sft_update` on a
stand-in for the DeepSpeed engine."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from innerloop.actors.prompts import chat_prompt_ids
from innerloop.actors.tasks import BadRowError, generate_train_eval
from innerloop.distributed.config import AlgorithmConfig, LearnerConfig
from innerloop.distributed.records import PolicySums, Question, TrainingSample, Trajectory, UpdateMetrics
from innerloop.distributed.run.samples import loss_normalizers, sft_normalizer
from innerloop.distributed.run.sft_data import (
    SftTrajectory,
    answer_verifier,
    build_sft_set,
    group_by_question,
    load_trajectory_file,
    sft_samples,
    solution_trajectories,
    teacher_trajectories,
    write_trajectory_file,
)
from innerloop.learners import grpo
from innerloop.learners.batching import collate
from innerloop.learners.learner import Learner
from innerloop.learners.logprobs import token_logprobs

VERIFY = answer_verifier()
SYSTEM, TEMPLATE = "Solve it.", "{question}\nPut the final answer in \\boxed{{}}."


def traj(qid: str, completion: str, answer: str = "7", prompt: str | None = None) -> SftTrajectory:
    return SftTrajectory(qid, prompt or f"question {qid}", answer, completion)


def right(n: int, answer: str = "7") -> str:
    return f"Working, take {n}. The answer is \\boxed{{{answer}}}."


# ---------------------------------------------------------------- the trajectory file


def test_file_round_trip(tmp_path: Path):
    written = [traj("a", "  first line\nThe answer is \\boxed{7}.\n"), traj("b", "é \\boxed{3}", answer="3")]
    path = tmp_path / "t.jsonl"
    write_trajectory_file(path, written)
    loaded = load_trajectory_file(path)
    assert loaded.items == written  # the completion's whitespace is kept exactly
    assert loaded.skipped == 0 and loaded.skip_reasons == {}


def bad_file(tmp_path: Path) -> Path:
    good = {"question_id": "q1", "prompt": " What is 3 + 4? ", "answer": 7, "completion": "\\boxed{7}", "extra": 1}
    lines = [
        json.dumps(good),
        "",  # blank: ignored, not bad
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({**good, "completion": None}),
        json.dumps({k: v for k, v in good.items() if k != "answer"}),
        json.dumps({**good, "answer": "  "}),
        json.dumps({**good, "prompt": ["x"]}),
        json.dumps({**good, "question_id": "q2"}),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_lines_are_skipped_and_counted(tmp_path: Path):
    loaded = load_trajectory_file(bad_file(tmp_path))
    assert [t.question_id for t in loaded.items] == ["q1", "q2"]
    assert loaded.items[0] == SftTrajectory("q1", "What is 3 + 4?", "7", "\\boxed{7}")  # a number answer is text
    assert loaded.skipped == 6
    assert loaded.skip_reasons == {
        "the line is not valid JSON (Expecting property name enclosed in double quotes)": 1,
        "the line is a JSON list, expected an object with keys question_id, prompt, answer, completion": 1,
        "field 'completion' is missing": 1,
        "field 'answer' is missing": 1,
        "field 'answer' is empty": 1,
        "field 'prompt' is a list, expected text or a number": 1,
    }


def test_fail_mode_names_the_file_and_line(tmp_path: Path):
    path = bad_file(tmp_path)
    with pytest.raises(BadRowError, match=r"bad\.jsonl, line 3: the line is not valid JSON.*on_bad_row='skip'"):
        load_trajectory_file(path, on_bad_row="fail")
    path.write_text(json.dumps({"question_id": "q", "prompt": "p", "answer": "1", "completion": " \n"}) + "\n")
    with pytest.raises(BadRowError, match=r"line 1: field 'completion' is empty"):
        load_trajectory_file(path, on_bad_row="fail")


def test_file_errors_in_the_users_terms(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_trajectory_file(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="on_bad_row must be 'skip' or 'fail'"):
        load_trajectory_file(bad_file(tmp_path), on_bad_row="drop")


# ---------------------------------------------------------------- other sources


@pytest.mark.parametrize("kind", ["addition", "arithmetic", "word", "mixed"])
@pytest.mark.parametrize("difficulty", [1, 3])
def test_generator_solutions_verify_with_the_real_verifier(kind: str, difficulty: int):
    questions, _ = generate_train_eval(kind, 30, 0, seed=5, difficulty=difficulty)
    assert len(questions) == 30
    trajectories = solution_trajectories(questions)
    assert [t.question_id for t in trajectories] == [q.question_id for q in questions]
    for q, t in zip(questions, trajectories):
        assert t.completion == q.solution and "\\boxed{" in t.completion  # already boxed: unchanged
        assert VERIFY(t.completion, q.answer), t.completion
        assert not VERIFY(t.completion, str(int(q.answer) + 1))  # the check can fail


def test_unboxed_solutions_get_the_answer_appended_and_missing_ones_are_skipped(caplog):
    questions = [Question("g", "How many?", "72", "48 + 24 = 72 clips.\n#### 72\n"),
                 Question("none", "How many?", "5"),
                 Question("boxed", "Sum?", "3", "1 + 2 = \\boxed{3}")]
    trajectories = solution_trajectories(questions)
    assert [t.completion for t in trajectories] == [
        "48 + 24 = 72 clips.\n#### 72\nThe answer is \\boxed{72}.", "1 + 2 = \\boxed{3}"]
    assert all(VERIFY(t.completion, t.answer) for t in trajectories)
    assert "1 of 3 questions have no worked solution" in caplog.text


def test_teacher_rollouts_become_text_trajectories():
    questions = [Question("q1", "What is 3 + 4?", "7")]
    rollout = Trajectory("q1", (1, 2), (3,), (-0.1,), "stop", "so \\boxed{7}", 1.0, True, True, 0)
    assert teacher_trajectories([rollout], questions) == [SftTrajectory("q1", "What is 3 + 4?", "7", "so \\boxed{7}")]
    with pytest.raises(ValueError, match="'q9'"):
        teacher_trajectories([Trajectory("q9", (), (), (), "stop", "", 0.0, False, False, 0)], questions)


def test_group_by_question_refuses_one_id_for_two_questions():
    groups = group_by_question([traj("a", "x"), traj("b", "y"), traj("a", "z")])
    assert {qid: [t.completion for t in g] for qid, g in groups.items()} == {"a": ["x", "z"], "b": ["y"]}
    with pytest.raises(ValueError, match="'a' appears with two different prompts or answers"):
        group_by_question([traj("a", "x"), traj("a", "y", answer="8")])


# ---------------------------------------------------------------- the balanced set


def mixed_pool() -> dict[str, list[SftTrajectory]]:
    return group_by_question([
        *(traj("many", right(n)) for n in range(6)),  # six distinct correct
        traj("many", "The answer is \\boxed{8}."), traj("many", "no box at all: 7"),  # wrong, unformatted
        traj("one", right(0)), traj("one", right(0)), traj("one", "\\boxed{1}"),  # one text twice, one wrong
        traj("none", "\\boxed{6}"), traj("none", "seven"),  # nothing right: dropped
        traj("two", right(0)), traj("two", right(1)),
    ])


def test_k_distinct_correct_then_padded_by_duplication():
    sft = build_sft_set(mixed_pool(), k=4, seed=0, verify=VERIFY)
    by_question: dict[str, list[str]] = {}
    for item in sft.items:
        by_question.setdefault(item.question_id, []).append(item.completion)
    assert list(by_question) == ["many", "one", "two"]  # first-seen order; "none" dropped
    assert all(len(c) == 4 for c in by_question.values()) and len(sft.items) == 12  # each seen equally often
    assert all(VERIFY(item.completion, item.answer) for item in sft.items)  # wrong ones filtered
    assert len(set(by_question["many"])) == 4  # more than k distinct: k of them, no repeat
    assert by_question["one"] == [right(0)] * 4  # the same text twice counts once
    assert by_question["two"] == [right(0), right(1), right(0), right(1)]  # cycled in turn
    assert (sft.k, sft.questions_kept, sft.questions_dropped, sft.dropped_ids) == (4, 3, 1, ("none",))
    assert sft.distinct_per_question == {1: 1, 2: 1, 4: 1}
    assert sft.wrong == 2 + 1 + 2 and sft.duplicates == 1


def test_fewer_distinct_than_k_cycles_through_all_of_them():
    pool = group_by_question(traj("q", right(n)) for n in range(3))
    items = build_sft_set(pool, k=7, seed=0, verify=VERIFY).items
    assert [i.completion for i in items] == [right(n) for n in (0, 1, 2, 0, 1, 2, 0)]


def test_rows_pad_every_question_to_the_same_count_so_only_diversity_changes_with_k():
    pool = mixed_pool()
    for k in (1, 2, 4):
        sft = build_sft_set(pool, k=k, seed=0, verify=VERIFY, rows=4)
        by_question: dict[str, list[str]] = {}
        for item in sft.items:
            by_question.setdefault(item.question_id, []).append(item.completion)
        assert (sft.k, sft.rows, len(sft.items)) == (k, 4, 12)  # the same volume for every k
        assert all(len(rows) == 4 for rows in by_question.values())
        assert len(set(by_question["many"])) == k  # the diversity is what k changes
    assert build_sft_set(pool, k=2, seed=0, verify=VERIFY, rows=5).items[:5] == \
        build_sft_set(pool, k=2, seed=0, verify=VERIFY, rows=6).items[:5]  # the same k picked, padded in turn
    assert build_sft_set(pool, k=3, seed=0, verify=VERIFY).rows == 3  # no rows: k, as before
    with pytest.raises(ValueError, match="rows per question \\(2\\) must be at least k = 3"):
        build_sft_set(pool, k=3, seed=0, verify=VERIFY, rows=2)


def test_the_config_checks_rows_against_k_and_the_batch():
    from innerloop.distributed.config_base import ConfigError
    from innerloop.distributed.config_load import load_config

    cfg = load_config(None, ["sft.steps=2", "sft.distinct=2", "sft.rows=8", "sft.questions_per_step=4"])
    assert cfg.sft.rows_per_question == 8
    with pytest.raises(ConfigError, match="sft.rows = 1 is below sft.distinct = 2"):
        load_config(None, ["sft.distinct=2", "sft.rows=1"])
    with pytest.raises(ConfigError, match="sft.questions_per_step x sft.rows = 9"):
        load_config(None, ["sft.steps=2", "sft.rows=3", "sft.questions_per_step=3"])


def test_selection_is_seeded_and_reproducible():
    pool = mixed_pool()
    def pick(seed: int, questions=pool) -> list[str]:
        return [i.completion for i in build_sft_set(questions, k=3, seed=seed, verify=VERIFY).items]

    picks = {seed: pick(seed) for seed in range(8)}
    assert pick(3) == picks[3]
    assert len({tuple(p) for p in picks.values()}) > 1  # the seed moves the choice among six
    # A question's pick depends only on the seed and its own id, not on the other questions.
    assert pick(3, {"many": pool["many"]}) == picks[3][:3]


def test_builder_checks_k_and_uses_the_verifier_given():
    with pytest.raises(ValueError, match="k .* must be >= 1, got 0"):
        build_sft_set(mixed_pool(), k=0, seed=0, verify=VERIFY)
    everything = build_sft_set(mixed_pool(), k=2, seed=0, verify=lambda completion, answer: True)
    assert everything.questions_dropped == 0 and everything.wrong == 0


# ---------------------------------------------------------------- tokens


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.tiny_model import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_prompt_is_the_rollout_workers_and_loss_covers_completion_and_eos(tokenizer):
    from innerloop.actors.rollout import RolloutWorker

    items = [traj("a", "3 + 4 = 7. The answer is \\boxed{7}.", prompt="What is 3 + 4?"),
             traj("b", " so we get \\boxed{12}", answer="12", prompt="What is 5 + 7?")]
    samples = sft_samples(items, tokenizer, SYSTEM, TEMPLATE)
    worker = SimpleNamespace(_tokenizer=tokenizer, _system_prompt=SYSTEM, _prompt_template=TEMPLATE)
    eos = tokenizer.eos_token_id
    for item, sample in zip(items, samples):
        prompt = RolloutWorker.prompt_ids(worker, Question(item.question_id, item.prompt, item.answer))
        completion = tokenizer.encode(item.completion, add_special_tokens=False)
        assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
        assert list(sample.input_ids) == prompt + completion + [eos]
        assert list(sample.loss_mask) == [0] * len(prompt) + [1] * (len(completion) + 1)
        assert tokenizer.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if m]) == \
            item.completion + tokenizer.eos_token
        assert set(sample.sampler_logprobs) == {0.0} and sample.advantage == 1.0 and sample.update


def test_a_completion_written_with_its_eos_keeps_one(tokenizer):
    [sample] = sft_samples([traj("a", "\\boxed{7}<|im_end|>")], tokenizer, "", "{question}")
    assert sample.input_ids[-1] == tokenizer.eos_token_id and sample.input_ids[-2] != tokenizer.eos_token_id
    prompt = chat_prompt_ids(tokenizer, "question a", "", "{question}")
    assert sample.input_ids[: sample.loss_mask.index(1)] == tuple(prompt)


def test_a_tokenizer_without_eos_is_refused():
    with pytest.raises(ValueError, match="no eos token"):
        sft_samples([traj("a", "x")], SimpleNamespace(eos_token_id=None), "", "{question}")


def test_sft_normalizer_counts_loss_tokens_or_sequences():
    samples = [TrainingSample((1, 2, 3, 4), (0, 1, 1, 1), (0.0,) * 4, 1.0),
               TrainingSample((1, 2), (0, 1), (0.0,) * 2, 1.0)]
    assert sft_normalizer(samples, "token") == 4.0
    assert sft_normalizer(samples, "sequence") == 2.0


# ---------------------------------------------------------------- Learner.sft_update on a stand-in engine

V = 97


class StandInEngine:
    """What `Learner` uses of DeepSpeed's engine. Gradients accumulate as DeepSpeed's do: each
    micro-batch's loss divided by the accumulation steps, and averaged over ranks (ranks here share
    one model, so their gradients add up and the average divides by the world size)."""

    def __init__(self, model: torch.nn.Module, micro_batch_size: int, world_size: int):
        self.model, self.micro_batch_size, self.world_size = model, micro_batch_size, world_size
        self.device, self.accumulation, self.micro_steps = torch.device("cpu"), 0, 0
        self.boundaries: list[bool] = []  # per micro-batch: whether the optimizer steps after it

    def __call__(self, **inputs):
        return self.model(**inputs)

    def set_train_batch_size(self, size: int) -> None:
        self.accumulation = size // (self.micro_batch_size * self.world_size)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / (self.accumulation * self.world_size)).backward()

    def step(self) -> None:
        self.micro_steps += 1

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        self.boundaries.append(is_boundary)

    def get_lr(self) -> list[float]:
        return [1e-5]

    def train(self) -> None:
        self.model.train()

    def get_global_grad_norm(self) -> float:
        return float(torch.cat([p.grad.flatten() for p in self.model.parameters() if p.grad is not None]).norm())

    def was_step_applied(self) -> bool:
        return True


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).double()  # float64: sums in any order agree to ~1e-12


def learner_ranks(model, world_size: int, algorithm: AlgorithmConfig, micro_batch_size: int = 2) -> list[Learner]:
    ranks = []
    for rank in range(world_size):
        learner = Learner.__new__(Learner)  # no process group, no DeepSpeed: only what an update reads
        learner.rank, learner.world_size, learner._pad_id, learner._reference = rank, world_size, 0, None
        learner._cfg = LearnerConfig(micro_batch_size=micro_batch_size)
        learner._algo, learner._temperature = algorithm, 0.7
        learner.engine = StandInEngine(model, micro_batch_size, world_size)
        ranks.append(learner)
    return ranks


def random_samples(count: int = 6) -> list[TrainingSample]:
    g = torch.Generator().manual_seed(1)
    samples = []
    for i in range(count):
        prompt, completion = 3 + (2 * i) % 5, 2 + (3 * i) % 4
        ids = tuple(torch.randint(1, V, (prompt + completion,), generator=g).tolist())
        samples.append(TrainingSample(ids, (0,) * prompt + (1,) * completion, (0.0,) * len(ids), 1.0 - i / 3))
    return samples


def completion_only_nll(model, samples: list[TrainingSample], aggregation: str) -> torch.Tensor:
    """The SFT loss by hand: each sample alone, unpadded, -log p(token | prefix) at its completion positions only."""
    per_sample = []
    for s in samples:
        ids = torch.tensor([s.input_ids])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1] / 0.7, dim=-1)  # row t predicts ids[t + 1]
        targets = [t for t, m in enumerate(s.loss_mask) if m]
        nll = torch.stack([-logp[t - 1, s.input_ids[t]] for t in targets])
        per_sample.append(nll.sum() if aggregation == "token" else nll.mean())
    units = sum(sum(s.loss_mask) for s in samples) if aggregation == "token" else len(samples)
    return torch.stack(per_sample).sum() / units


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_sft_update_is_the_completion_nll_of_the_whole_batch(world_size: int, aggregation: str):
    samples, algorithm = random_samples(), AlgorithmConfig(aggregation=aggregation)
    model, reference = tiny_llama(), tiny_llama()
    normalizer = sft_normalizer(samples, aggregation)
    metrics = [learner.sft_update(samples, normalizer) for learner in learner_ranks(model, world_size, algorithm)]

    expected = completion_only_nll(reference, samples, aggregation)
    expected.backward()
    summed = UpdateMetrics.over_ranks(metrics).sums
    torch.testing.assert_close(summed.loss, float(expected.detach()), rtol=1e-9, atol=0)
    assert summed.nll == summed.loss and summed.tokens == sum(sum(s.loss_mask) for s in samples)
    assert set(metrics[0].record()) == {"loss", "nll", "tokens", "grad_norm", "learning_rate", "update_seconds",
                                        "step_skipped"}
    assert metrics[0].skipped is False and metrics[0].learning_rate == 1e-5
    # The micro-batched, sharded gradient is the whole batch's, and only completion tokens carry loss.
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-7, atol=1e-12, msg=name)
    assert metrics[-1].grad_norm > 0


def test_update_through_the_shared_loop_is_still_the_whole_batch_grpo_loss():
    samples, algorithm = random_samples(), AlgorithmConfig()
    normalizers = loss_normalizers(samples, algorithm)
    model, reference = tiny_llama(), tiny_llama()
    metrics = [learner.update(samples, normalizers) for learner in learner_ranks(model, 2, algorithm)]
    assert isinstance(metrics[0].sums, PolicySums)  # loss, policy_loss, kl, entropy, token counts, weighted sums
    assert set(metrics[0].record()) == {"loss", "policy_loss", "kl", "entropy", "clipped_tokens", "policy_tokens",
                                        "tokens", "clip_fraction", "is_weight_mean", "is_bounded_fraction", "sampler_logprob_gap",
                                        "step_skipped", "grad_norm", "learning_rate", "update_seconds",
                                        "reference_seconds"}
    assert metrics[0].reference_seconds == 0.0

    batch = collate(samples, pad_id=0)  # the whole batch at once, one forward
    logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logprobs = token_logprobs(logits, batch.input_ids, temperature=0.7)
    expected, expected_metrics = grpo.grpo_loss(
        logprobs, logprobs.detach(), batch.advantages, batch.loss_mask, batch.update_mask, normalizers,
        clip_low=algorithm.clip_low, clip_high=algorithm.clip_high, aggregation=algorithm.aggregation)
    expected.backward()
    summed = UpdateMetrics.over_ranks(metrics).sums
    torch.testing.assert_close(summed.loss, float(expected.detach()), rtol=1e-9, atol=0)
    assert summed.tokens == float(expected_metrics["tokens"]) == float(batch.loss_mask.sum())
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-7, atol=1e-12, msg=name)


def test_the_optimizer_steps_after_each_updates_last_micro_batch_whatever_came_before():
    """DeepSpeed counts micro-steps across calls: an SFT step of another batch size would move its
    accumulation boundary into the middle of the next update unless the learner sets it."""
    (learner,) = learner_ranks(tiny_llama(), 1, AlgorithmConfig(), micro_batch_size=2)
    samples = random_samples(6)
    learner.sft_update(samples[:2], sft_normalizer(samples[:2], "token"))  # one micro-batch
    learner.sft_update(samples, sft_normalizer(samples, "token"))  # three
    assert learner.engine.boundaries == [True, False, False, True]
