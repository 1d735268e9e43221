"""Bad input fails clearly, in the user's terms, and loses nothing: the cases not covered elsewhere.

Where each bad-input case is tested:
- malformed or partial config: here, and tests/test_config.py (unknown keys, wrong types, bad YAML);
- dataset rows missing fields: tests/test_tasks.py; unparsable reference answers: here;
- reward functions that raise or hang: tests/test_rewards.py (the guarded scorer);
- NaN/inf loss or gradients: tests/test_recovery.py (driver), tests/test_integration.py (real learner);
- disk full during a checkpoint: tests/test_checkpoints.py;
- a missing or incompatible model folder: tests/test_model_prep.py.
"""

from __future__ import annotations

import json

import pytest

from innerloop.distributed.config import ConfigError

from innerloop.distributed.config_load import load_config
from innerloop.distributed.run.checks import check_inputs


def test_a_config_file_cut_off_mid_write_fails_naming_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("rollout:\n  temperature: 0.8\n  group_size: [8,\n")  # truncated inside a list
    with pytest.raises(ConfigError, match=r"exp.yaml is not valid YAML"):
        load_config(path)


def test_a_partial_config_fills_the_rest_from_the_defaults(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("rollout:\n  temperature: 0.8\n")
    cfg = load_config(path)
    assert cfg.rollout.temperature == 0.8
    assert cfg.learner == load_config().learner


def _dataset(tmp_path, answers):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}?", "answer": a}) + "\n" for i, a in enumerate(answers)))
    return path


def test_unparsable_reference_answers_are_skipped_and_counted(tmp_path, caplog):
    answers = ["42", "\\frac{1}{2}", "}{", "7", "3.5"]
    cfg = load_config(None, ["tasks.source=dataset", f"tasks.path={_dataset(tmp_path, answers)}",
                             "tasks.eval_count=1"])
    train, held_out = check_inputs(cfg)
    kept = {q.answer for q in train + held_out}
    assert kept == {"42", "\\frac{1}{2}", "7", "3.5"}
    assert "skipped 1 questions whose reference answer the math verifier cannot parse" in caplog.text


def test_a_reference_made_of_words_is_not_an_answer(tmp_path, caplog):
    # Parsed as a product of letters, "seven" would match any anagram: "\\boxed{seven is the answer}".
    answers = ["42", "the answer is seven", "5\\text{ cm}", "\\sqrt{2}", "x + 1"]
    cfg = load_config(None, ["tasks.source=dataset", f"tasks.path={_dataset(tmp_path, answers)}",
                             "tasks.eval_count=1"])
    train, held_out = check_inputs(cfg)
    assert {q.answer for q in train + held_out} == {"42", "5\\text{ cm}", "\\sqrt{2}", "x + 1"}
    assert "'the answer is seven'" in caplog.text


def test_a_skipped_dataset_row_is_warned_about_once(tmp_path, caplog):
    path = _dataset(tmp_path, ["1", "2", "3"])
    path.write_text(path.read_text() + '{"question": "no answer?"}\n')
    cfg = load_config(None, ["tasks.source=dataset", f"tasks.path={path}", "tasks.eval_count=1"])
    check_inputs(cfg)
    skips = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skips == [f"{path}: skipped 1 bad rows of 4 (1 x field 'answer' is missing)"]


def test_unparsable_reference_answers_stop_the_load_in_fail_mode(tmp_path):
    cfg = load_config(None, ["tasks.source=dataset", f"tasks.path={_dataset(tmp_path, ['42', '}{'])}",
                             "tasks.eval_count=1", "tasks.on_bad_row=fail"])
    with pytest.raises(ConfigError, match=r"cannot parse 1 reference answers.*on_bad_row=skip"):
        check_inputs(cfg)


def test_a_custom_reward_takes_answers_the_verifier_cannot_read(tmp_path):
    cfg = load_config(None, ["tasks.source=dataset", f"tasks.path={_dataset(tmp_path, ['42', '}{', 'blue'])}",
                             "tasks.eval_count=1", "reward.kind=custom", "reward.custom=tests.doubles:length_reward"])
    train, held_out = check_inputs(cfg)
    assert len(train + held_out) == 3


@pytest.mark.parametrize("override, words", [
    ("rollout.group_size=1", ["rollout.group_size = 1", "always 0 in a group of one", "2 or more"]),
    ("tasks.prompt_template=Q: {q}", ["tasks.prompt_template", "KeyError('q')", "{question}"]),
    ("tasks.prompt_template=Q: {question} \\boxed{}", ["cannot be filled", "doubled"]),
    ("tasks.prompt_template=no placeholder", ["must contain '{question}'"]),
    ("learner.betas=[0.9, 1.0]", ["learner.betas", "[0, 1)"]),
])
def test_settings_that_cannot_work_stop_before_start(override, words):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert all(w in str(caught.value) for w in words), str(caught.value)


def test_a_config_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("rollout:\n  stop: ['\u00e9']\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text \(byte \d+\); save it as UTF-8"):
        load_config(path)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tests.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny")))


def _long_and_short():
    from innerloop.distributed.records import Question

    return [Question("short", "What is 1 + 2?", "3"), Question("long", "What is 1 + 2? " * 200, "3")]


def test_a_prompt_longer_than_the_model_length_is_skipped_and_counted(tiny_folder, caplog):
    from transformers import AutoTokenizer

    from innerloop.distributed.run.questions import fitting_prompts

    # The tiny model has 512 positions: the cap applies even when rollout.max_model_len asks for more.
    cfg = load_config(None, ["rollout.max_model_len=4096"])
    kept = fitting_prompts(_long_and_short(), cfg, tiny_folder, AutoTokenizer.from_pretrained(tiny_folder))
    assert [q.question_id for q in kept] == ["short"]
    assert "skipped 1 questions leave no room to generate within 512 tokens" in caplog.text
    assert "question long is" in caplog.text


def test_a_prompt_longer_than_the_model_length_stops_the_load_in_fail_mode(tiny_folder):
    from transformers import AutoTokenizer

    from innerloop.distributed.run.questions import fitting_prompts

    cfg = load_config(None, ["rollout.max_model_len=256", "tasks.on_bad_row=fail"])
    with pytest.raises(ValueError, match=r"within 256 tokens.*question long is \d+ tokens.*on_bad_row=skip"):
        fitting_prompts(_long_and_short(), cfg, tiny_folder, AutoTokenizer.from_pretrained(tiny_folder))


@pytest.mark.parametrize("lines, why", [
    (["not json", "{also not"], "line 1: the line is not valid JSON"),
    (["[1, 2]", "[3]"], "line 1: a JSON list"),
])
def test_a_jsonl_without_one_json_object_says_so_from_the_first_line(tmp_path, lines, why):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = load_config(None, ["tasks.source=dataset", f"tasks.path={path}"])
    with pytest.raises(ConfigError, match=f"no line is a JSON object, one question per line \\({why}"):
        check_inputs(cfg)


def test_one_id_naming_two_questions_is_a_data_error(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"id": "q1", "question": "What is 1 + 1?", "answer": "2"},
            {"id": "q1", "question": "What is 2 + 2?", "answer": "4"},
            {"id": "q2", "question": "What is 3 + 3?", "answer": "6"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, ["tasks.source=dataset", f"tasks.path={path}", "tasks.id_field=id", "tasks.eval_count=1"])
    with pytest.raises(ConfigError, match=r"the id 'q1' names two different questions"):
        check_inputs(cfg)


def test_more_actors_than_the_cluster_holds_are_refused_at_once_on_our_own_cluster(caplog):
    from innerloop.distributed.cluster.placement import check_fits
    from innerloop.distributed.errors import RunStopped

    cfg = load_config(None, ["rollout.workers=9", "learner.ranks=2"])
    check_fits(cfg, {"CPU": 11.0}, joined=False)  # fits exactly
    with pytest.raises(RunStopped, match=r"rollout.workers=9 do not fit: 11 CPUs needed, 8 in the cluster"):
        check_fits(cfg, {"CPU": 8.0}, joined=False)
    gpu = load_config(None, ["rollout.gpus_per_worker=1", "learner.gpus_per_rank=1"])
    check_fits(gpu, {"CPU": 8.0, "GPU": 1.0}, joined=True)  # a joined cluster may still grow: a warning
    assert "2 GPUs needed, 1 in the cluster" in caplog.text
