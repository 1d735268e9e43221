"""The inner-loop probe: the cached curve equals a full forward per prefix; summaries, attribution, files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from innerloop.distributed.config import DEFAULT_SUFFIX
from innerloop.distributed.lens.probe import check_label, summarize_groups, write_probe
from innerloop.distributed.records import Question, Trajectory
from innerloop.learners.probe import (ProbeItem, answer_nll_curve, control_items, items_from_trajectories,
                                      probe_positions, probe_trajectories, suffix_tokens)
from innerloop.learners.probe_summary import (answer_position, attribute, summarize_curve, summarize_cut,
                                              word_spans)
from tests.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_folder
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: a tiny model needs no more
    yield AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)
    torch.set_num_threads(threads)


def naive_curve(model, prompt_ids, completion_ids, suffix_ids, answer_len, positions) -> list[float]:
    """The reference: a full forward over prompt + y[:i] + suffix for every prefix i."""
    values = []
    with torch.no_grad():
        for i in positions:
            ids = torch.tensor([list(prompt_ids) + list(completion_ids[:i]) + list(suffix_ids)])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            targets = ids[0, 1:]
            token_logprobs = logprobs.gather(-1, targets[:, None]).squeeze(-1)
            values.append(-token_logprobs[-answer_len:].mean().item())
    return values


def _example(tokenizer):
    prompt = tokenizer.encode("<|im_start|>user\nWhat is 12 + 9?<|im_end|>\n<|im_start|>assistant\n")
    completion = tokenizer.encode("12 + 9 = 21. Wait, so the sum is 21. But the answer is 21.")
    suffix_ids, answer_len = suffix_tokens(tokenizer, DEFAULT_SUFFIX, "21")
    return prompt, completion, suffix_ids, answer_len


@pytest.mark.parametrize("every, batch_size", [(1, 8), (1, 1), (3, 4)])
def test_cached_curve_equals_a_full_forward_per_prefix(tiny, every, batch_size):
    model, tokenizer = tiny
    prompt, completion, suffix_ids, answer_len = _example(tokenizer)
    curve = answer_nll_curve(model, prompt, completion, suffix_ids, answer_len, every=every, batch_size=batch_size)
    assert curve.positions[0] == 0 and curve.positions[-1] == len(completion)
    expected = naive_curve(model, prompt, completion, suffix_ids, answer_len, curve.positions)
    torch.testing.assert_close(torch.tensor(curve.values), torch.tensor(expected), atol=1e-5, rtol=0)
    assert len(set(round(v, 4) for v in curve.values)) > 1  # the prefix changes the answer's NLL


def test_an_empty_trajectory_has_one_point_the_prompt_alone(tiny):
    model, tokenizer = tiny
    prompt, _, suffix_ids, answer_len = _example(tokenizer)
    curve = answer_nll_curve(model, prompt, [], suffix_ids, answer_len)
    assert curve.positions == (0,)
    assert curve.values[0] == pytest.approx(naive_curve(model, prompt, [], suffix_ids, answer_len, [0])[0], abs=1e-5)


def test_probe_positions_subsample_and_always_end_at_the_trajectory_end():
    assert probe_positions(10, 1) == tuple(range(11))
    assert probe_positions(10, 3) == (0, 3, 6, 9, 10)
    assert probe_positions(9, 3) == (0, 3, 6, 9)
    assert probe_positions(0, 5) == (0,)
    with pytest.raises(ValueError, match="every must be at least 1"):
        probe_positions(10, 0)


def test_bad_suffixes_fail_in_the_users_terms(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="exactly once"):
        suffix_tokens(tokenizer, "\\boxed{", "21")
    with pytest.raises(ValueError, match="lead-in"):
        suffix_tokens(tokenizer, "{answer}", "21")
    with pytest.raises(ValueError, match="needs a lead-in"):
        answer_nll_curve(model, [1, 2], [3], [5, 6], answer_len=2)
    with pytest.raises(ValueError, match="label"):
        check_label("step 3/4")


def test_suffix_scores_exactly_the_answer_tokens_and_drops_the_closing_brace(tiny):
    _, tokenizer = tiny
    suffix_ids, answer_len = suffix_tokens(tokenizer, DEFAULT_SUFFIX, "21")
    assert tokenizer.decode(suffix_ids) == "\n\n**Final Answer**\n\\boxed{21"
    assert tokenizer.decode(suffix_ids[-answer_len:]) == "21"


def test_summaries_of_hand_made_curves():
    falling = summarize_curve([0, 2, 4], [3.0, 2.0, 1.0], completion_length=4)
    assert (falling.start, falling.end) == (3.0, 1.0)
    assert falling.slope == pytest.approx(-2.0)  # x is the prefix fraction: from 3 to 1 over the whole trajectory
    assert falling.area == pytest.approx(2.0)  # the mean height of the line
    bent = summarize_curve([0, 1, 4], [4.0, 0.0, 0.0], completion_length=4)
    assert bent.area == pytest.approx(0.5)  # a triangle of base 1/4 and height 4, then nothing
    assert summarize_curve([0, 2], [1.0, 1.0], 2).slope == 0.0
    assert summarize_curve([0], [2.5], 0) == summarize_curve([0], [2.5], 0).__class__(2.5, 2.5, 0.0, 2.5)


def test_word_spans_are_whole_words_over_one_or_several_tokens():
    tokens = ["So", " Wait", ",", " But", "ter", " is", " Hold", " on", " rebut", " Alternatively"]
    assert word_spans(tokens) == (("Wait", 1, 2), ("Hold on", 6, 8), ("Alternatively", 9, 10))
    assert word_spans(["W", "ait", " now"]) == (("Wait", 0, 2),)  # one word split over two tokens
    assert word_spans(["But", " wait"], ["But", "wait"]) == (("But", 0, 1), ("wait", 1, 2))


def test_the_answer_position_is_where_it_first_stands_alone():
    tokens = ["12", " +", " 9", " =", " 2", "1", ". \\boxed{", "21", "}"]
    assert answer_position(tokens, "21") == 4  # " 2" begins it: the prefix of 4 tokens holds none of it
    assert answer_position(["142", " 4.2", " 420"], "42") is None and answer_position(["so -7."], "-7") == 0
    assert answer_position(["x"], "") is None


def test_the_cut_summary_keeps_the_prefixes_before_the_answer():
    positions, values = [0, 2, 4, 6, 8], [3.0, 3.0, 3.0, 1.0, 0.5]
    cut = summarize_cut(positions, values, 8, cut=4)  # flat until the answer, the fall is after it
    assert (cut.start, cut.end, cut.slope) == (3.0, 3.0, 0.0)
    assert summarize_cut(positions, values, 8, None) == summarize_curve(positions, values, 8)  # never written
    assert summarize_cut(positions, values, 8, cut=1) is None  # one point: no slope


def test_attribution_is_the_papers_relative_change_against_all_tokens():
    spans = (("Wait", 1, 2), ("Hold on", 2, 4))
    # c: 2 -> 1 at token 0 (|-50%|), 1 -> 1.5 at "Wait" (50%), 1.5 -> 0.75 and 0.75 -> 0.75 at "Hold on" (50%, 0%)
    attribution = attribute([0, 1, 2, 3, 4], [2.0, 1.0, 1.5, 0.75, 0.75], spans, ("Wait", "Hold on"))
    per_word = {g.label: g for g in attribution.per_word}
    assert per_word["Wait"].count == 1 and per_word["Wait"].mean == pytest.approx(0.5)
    assert per_word["Hold on"].count == 1 and per_word["Hold on"].mean == pytest.approx(0.25)  # mean of its 2 tokens
    assert attribution.any_word.count == 2 and attribution.any_word.mean == pytest.approx(0.375)
    assert attribution.all_tokens.count == 4 and attribution.all_tokens.mean == pytest.approx(0.375)  # all four
    # every=2: steps [0, 2) (2 -> 1.5: 25%) and [2, 4) (1.5 -> 0.75: 50%); "Wait" lies in the first.
    coarse = {g.label: g for g in attribute([0, 2, 4], [2.0, 1.5, 0.75], spans, ("Wait", "Hold on")).per_word}
    assert coarse["Wait"].mean == pytest.approx(0.25) and coarse["Hold on"].mean == pytest.approx(0.5)
    assert attribute([0, 2], [0.0, 1.0], spans).any_word.count == 0  # no relative change from 0


def _trajectory(question_id, prompt, completion, correct) -> Trajectory:
    return Trajectory(question_id, tuple(prompt), tuple(completion), (0.0,) * len(completion), "stop", "",
                      1.0 if correct else 0.0, correct, True, 0)


def test_probe_files_and_plot_from_hand_made_trajectories(tiny, tmp_path):
    model, tokenizer = tiny
    prompt, completion, _, _ = _example(tokenizer)
    end = tokenizer.eos_token_id
    trajectories = [_trajectory("q1", prompt, completion + [end], True),
                    _trajectory("q1", prompt, completion[:7], False),
                    _trajectory("q2", prompt, tokenizer.encode("7 + 1 = 8. Wait, 8."), False)]
    questions = [Question("q1", "What is 12 + 9?", "21"), Question("q2", "What is 7 + 1?", "8")]
    items = items_from_trajectories(trajectories, questions, {end})
    assert items[0] == ProbeItem("q1", tuple(prompt), tuple(completion), "21", True)  # end token dropped
    records = probe_trajectories(model, tokenizer, items, every=2)
    assert [r.positions[-1] for r in records] == [len(completion), 7, len(trajectories[2].completion_ids)]
    assert sum(r.attribution.any_word.count for r in records) == 3  # "Wait" twice, "But" once
    assert records[2].answer_at is not None and records[2].group == "incorrect"  # "8" is written there

    plot = write_probe(records, tmp_path / "probe", label="step-3")
    lines = [json.loads(line) for line in (tmp_path / "probe" / "probe.jsonl").read_text().splitlines()]
    assert [(line["label"], line["question_id"], line["correct"]) for line in lines] == \
        [("step-3", "q1", True), ("step-3", "q1", False), ("step-3", "q2", False)]
    assert lines[0]["curve"] == list(records[0].curve) and lines[0]["summary"]["start"] == records[0].curve[0]
    assert lines[0]["attribution"]["per_word"]["Wait"]["count"] == 1
    [summary] = [json.loads(line) for line in (tmp_path / "probe" / "probe_summary.jsonl").read_text().splitlines()]
    assert summary["correct"]["trajectories"] == 1 and summary["incorrect"]["trajectories"] == 2
    assert math.isclose(summary["incorrect"]["end"], (records[1].summary.end + records[2].summary.end) / 2)
    assert plot == tmp_path / "probe" / "curves-step-3.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 1000


def test_group_summaries_pool_attribution_over_trajectories():
    from innerloop.learners.probe import ProbeRecord

    def record(correct, values, spans):
        positions = tuple(range(len(values)))
        return ProbeRecord("q", correct, len(values) - 1, positions, tuple(values),
                           summarize_curve(positions, values, len(values) - 1), attribute(positions, values, spans),
                           "correct" if correct else "incorrect")

    records = [record(True, [2.0, 1.0, 1.0], (("Wait", 0, 1),)), record(True, [1.0, 2.0, 2.0], (("But", 0, 1),)),
               record(False, [1.0, 1.0], ())]
    correct, incorrect = summarize_groups(records)
    assert (correct.group, correct.trajectories, incorrect.trajectories) == ("correct", 2, 1)
    assert correct.start == pytest.approx(1.5) and correct.end == pytest.approx(1.5)
    assert correct.any_word.count == 2 and correct.any_word.mean == pytest.approx(0.75)  # (0.5 + 1.0) / 2
    assert correct.all_tokens.mean == pytest.approx(0.375) and incorrect.any_word.mean is None  # (0.5+0+1+0)/4
    with pytest.raises(ValueError, match="no probe records"):
        write_probe([], "unused", "x")


@pytest.mark.parametrize("option, message", [(["--every", "0"], "--every must be at least 1"),
                                             (["--suffix", "\\boxed{"], "exactly once"),
                                             (["--label", "a/b"], "probe label"),
                                             (["--words", ","], "--words")])
def test_probe_cli_refuses_bad_options_before_any_engine_starts(tmp_path, capsys, option, message):
    from innerloop.distributed.cli import main

    assert main(["probe", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"), *option]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


class _ScriptedWorker:
    """Stands in for the vLLM rollout worker: per question, its worked solution (right) then a wrong one."""

    def __init__(self, model_path, *_):
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(model_path)

    def generate(self, questions, samples_per_question, sampling=None):
        from innerloop.distributed.records import Rollout

        assert samples_per_question == 2 and sampling is not None
        encode = self._tokenizer.encode
        trajectories = tuple(_trajectory(q.question_id, encode(f"user: {q.prompt}\n"), encode(text), correct)
                             for q in questions for text, correct in ((q.solution, True), ("so the answer is 1", False)))
        return Rollout(trajectories, 0.0, 0.0)

    def close(self):
        pass


def test_probe_cli_after_sampling_writes_files_and_prints_both_groups_and_the_cost(tiny_folder, tmp_path, capsys,
                                                                                    monkeypatch):
    from innerloop.actors import rollout
    from innerloop.distributed.cli import main

    monkeypatch.setattr(rollout, "RolloutWorker", _ScriptedWorker)
    out = tmp_path / "out"
    assert main(["probe", str(tiny_folder), "--out", str(out), "--questions", "2", "--samples", "2", "--every", "2",
                 "--set", "tasks.eval_count=3", "--set", "tasks.train_count=5"]) == 0
    printed = capsys.readouterr().out
    assert "  correct: 2 trajectories" in printed and "incorrect: 2 trajectories" in printed
    assert "correct - incorrect uncut" in printed and "too few to conclude from" in printed
    assert "cached" in printed and "naive about" in printed
    lines = [json.loads(line) for line in (out / "probe.jsonl").read_text().splitlines()]
    assert [line["correct"] for line in lines] == [True, False, True, False]
    assert {line["label"] for line in lines} == {tiny_folder.name}
    assert all(line["positions"][-1] == line["completion_tokens"] for line in lines)
    assert (out / f"curves-{tiny_folder.name}.png").read_bytes()[:4] == b"\x89PNG"


def test_probe_cli_adds_the_other_question_control(tiny_folder, tmp_path, capsys, monkeypatch):
    from innerloop.actors import rollout
    from innerloop.distributed.cli import main

    monkeypatch.setattr(rollout, "RolloutWorker", _ScriptedWorker)
    out = tmp_path / "out"
    assert main(["probe", str(tiny_folder), "--out", str(out), "--questions", "2", "--samples", "2", "--every", "2",
                 "--other-question", "1", "--set", "tasks.eval_count=3", "--set", "tasks.train_count=5"]) == 0
    assert "other_question: 2 trajectories" in capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "probe.jsonl").read_text().splitlines()]
    controls = [line for line in lines if line["group"] == "other_question"]
    assert len(controls) == 2 and all(line["trajectory_of"] != line["question_id"] for line in controls)
    assert all(not line["correct"] for line in controls)
    [summary] = [json.loads(line) for line in (out / "probe_summary.jsonl").read_text().splitlines()]
    assert summary["other_question"]["trajectories"] == 2 and len(summary["comparisons"]["paired"]) == 4
    assert main(["probe", str(tiny_folder), "--out", str(out), "--questions", "1", "--other-question", "1"]) == 2
