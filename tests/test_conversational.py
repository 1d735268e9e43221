"""Conversational datasets (TRL's `prompt` column of chat messages) beside question/answer text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from innerloop.actors.prompts import chat_prompt_ids, question_prompt_ids
from innerloop.actors.rows import BadRowError
from innerloop.actors.tasks import load_dataset_questions
from innerloop.distributed.config import ConfigError
from innerloop.distributed.config_load import load_config
from innerloop.distributed.records import Question
from innerloop.distributed.run.checks import check_inputs
from tests.tiny_model import build_tokenizer

ROWS = [
    {"id": "a", "prompt": [{"role": "system", "content": "Answer in one line."},
                           {"role": "user", "content": "What is 2 + 2?"}], "answer": "4", "level": 1},
    {"id": "b", "prompt": [{"role": "user", "content": "What is 3 + 3?"}], "answer": "6", "level": 2},
    {"id": "c", "prompt": [{"role": "assistant", "content": "Hello."}], "answer": "1", "level": 1},  # no user turn
    {"id": "d", "prompt": [{"text": "not a message"}], "answer": "2", "level": 1},
]


def _write(tmp_path: Path, rows=ROWS) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_message_rows_become_questions_with_their_turns_and_columns(tmp_path):
    loaded = load_dataset_questions(_write(tmp_path), question_field="prompt", id_field="id")
    assert [q.question_id for q in loaded.items] == ["a", "b"] and loaded.skipped == 2
    assert set(loaded.skip_reasons) == {"field 'prompt' holds no user message",
                                        "field 'prompt' is a list but not chat messages ({'role': ..., 'content': ...} each)"}
    first = loaded.items[0]
    assert first.prompt == "What is 2 + 2?" and first.answer == "4"
    assert first.messages == (("system", "Answer in one line."), ("user", "What is 2 + 2?"))
    assert dict(first.columns) == {"id": "a", "answer": "4", "level": 1}


def test_a_row_with_no_user_message_stops_the_load_under_on_bad_row_fail(tmp_path):
    with pytest.raises(BadRowError, match=r"line 3: field 'prompt' holds no user message"):
        load_dataset_questions(_write(tmp_path, ROWS[:3]), question_field="prompt", id_field="id", on_bad_row="fail")


def test_the_rows_own_messages_are_the_prompt_and_the_system_prompt_fills_in_where_it_has_none(tmp_path):
    tokenizer = build_tokenizer(tmp_path / "tok")
    own = Question("a", "What is 2 + 2?", "4", messages=(("system", "Be brief."), ("user", "What is 2 + 2?")))
    rendered = tokenizer.decode(question_prompt_ids(tokenizer, own, "You tutor.", "{question} Box it."))
    assert "Be brief." in rendered and "You tutor." not in rendered and "Box it." not in rendered
    bare = Question("b", "What is 3 + 3?", "6", messages=(("user", "What is 3 + 3?"),))
    assert question_prompt_ids(tokenizer, bare, "You tutor.", "{question}") == \
        chat_prompt_ids(tokenizer, "What is 3 + 3?", "You tutor.", "{question}")
    plain = Question("p", "What is 1 + 1?", "2")  # question text: the template applies, as before
    assert question_prompt_ids(tokenizer, plain, "", "{question} Box it.") == \
        chat_prompt_ids(tokenizer, "What is 1 + 1?", "", "{question} Box it.")


def test_an_sft_stage_on_chat_messages_is_refused_before_anything_starts(tmp_path):
    rows = [{"id": str(i), "prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1)}
            for i in range(12)]
    cfg = load_config(None, ["tasks.source=dataset", f"tasks.path={_write(tmp_path, rows)}", "tasks.question_field=prompt",
                             "tasks.id_field=id", "tasks.eval_count=2", "sft.steps=2", "rollout.questions_per_step=2",
                             "sft.questions_per_step=2", "learner.micro_batch_size=2"])
    with pytest.raises(ConfigError, match=r"sft.steps=2 with a conversational dataset"):
        check_inputs(cfg)
