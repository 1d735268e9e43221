"""The synthetic generator, the train/eval split, and loading local datasets."""

from __future__ import annotations

from dataclasses import replace

import ast
import json
import logging
import operator
import re
from pathlib import Path

import pytest

from innerloop.actors.rewards import build_reward_fn, check_answer
from innerloop.actors.tasks import (
    BadRowError,
    generate_train_eval,
    load_dataset_questions,
    split_train_eval,
)
from innerloop.distributed.records import Question

KINDS = ["addition", "arithmetic", "word", "mixed"]


# ---------------------------------------------------------------- the generator


def generate_questions(kind: str, count: int, seed: int, difficulty: int) -> list[Question]:
    """`count` training questions with no eval set held out: the generator's stream itself."""
    questions, eval_set = generate_train_eval(kind, count, 0, seed=seed, difficulty=difficulty)
    assert len(questions) == count and eval_set == []
    return questions


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_questions(kind: str) -> None:
    first = generate_questions(kind, 30, seed=7, difficulty=2)
    assert first == generate_questions(kind, 30, seed=7, difficulty=2)
    assert first[:10] == generate_questions(kind, 10, seed=7, difficulty=2)  # a longer run extends a shorter
    assert first != generate_questions(kind, 30, seed=8, difficulty=2)
    assert len({q.question_id for q in first}) == len({q.prompt for q in first}) == 30


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("difficulty", [1, 3, 6])
def test_solutions_end_boxed_and_verify(kind: str, difficulty: int) -> None:
    four_way = build_reward_fn("four_way")
    for q in generate_questions(kind, 20, seed=1, difficulty=difficulty):
        assert re.fullmatch(r"-?\d+", q.answer)
        assert q.solution.endswith(f"\\boxed{{{q.answer}}}")
        assert check_answer(q.solution, q.answer).correct
        assert four_way(q.solution, q).reward == 1.0
        _check_worked_steps(q)


_STEP = re.compile(r"(-?\d+) ([-+*/]) (\d+) = (-?\d+)")
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}


def _check_worked_steps(q: Question) -> None:
    # Every "a op b = c" written in the solution is true arithmetic (and "/" divides exactly).
    for a, op, b, c in _STEP.findall(q.solution):
        assert _OPS[op](int(a), int(b)) == int(c), (q.prompt, a, op, b, c)
        if op == "/":
            assert int(a) % int(b) == 0


def _evaluate(expression: str) -> int:
    """An independent evaluator for + - * expressions (Python's own precedence via its AST)."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp):
            return ops[type(node.op)](walk(node.left), walk(node.right))
        assert isinstance(node, ast.Constant) and isinstance(node.value, int)
        return node.value

    return walk(ast.parse(expression, mode="eval").body)


@pytest.mark.parametrize("difficulty", [1, 2, 5])
def test_arithmetic_answers_are_right(difficulty: int) -> None:
    for q in generate_questions("arithmetic", 50, seed=3, difficulty=difficulty):
        expression = re.fullmatch(r"Compute (.+)\.", q.prompt).group(1)
        assert len(re.findall(r" [-+*] ", expression)) == difficulty  # difficulty = operations
        assert _evaluate(expression) == int(q.answer)


@pytest.mark.parametrize("difficulty", [1, 2, 4])
def test_addition_answers_and_digits(difficulty: int) -> None:
    for q in generate_questions("addition", 50, seed=3, difficulty=difficulty):
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", q.prompt).groups())
        assert a + b == int(q.answer)
        assert len(str(a)) == len(str(b)) == difficulty


@pytest.mark.parametrize("difficulty", [1, 4])
def test_word_problems_take_difficulty_steps(difficulty: int) -> None:
    for q in generate_questions("word", 30, seed=5, difficulty=difficulty):
        assert q.solution.count("Step ") == difficulty + 1  # the opening fact, then one per step
        assert q.prompt.endswith("?") and int(q.answer) >= 0


def test_mixed_draws_every_kind() -> None:
    prefixes = {q.question_id.split("-")[0] for q in generate_questions("mixed", 60, seed=0, difficulty=2)}
    assert prefixes == {"addition", "arithmetic", "word"}


def test_generator_errors() -> None:
    with pytest.raises(ValueError, match="choose one of: addition"):
        generate_questions("algebra", 5, seed=0, difficulty=1)
    with pytest.raises(ValueError, match="raise the difficulty"):
        generate_train_eval("addition", 10, 150, seed=0, difficulty=1)  # only 100 one-digit sums exist


# ---------------------------------------------------------------- train / eval


def _assert_disjoint(train: list[Question], eval_set: list[Question]) -> None:
    assert not {q.question_id for q in train} & {q.question_id for q in eval_set}
    assert not {q.prompt for q in train} & {q.prompt for q in eval_set}


@pytest.mark.parametrize("kind", KINDS)
def test_generate_train_eval_is_disjoint_and_eval_is_stable(kind: str) -> None:
    train, eval_set = generate_train_eval(kind, 300, 40, seed=0, difficulty=2)
    assert (len(train), len(eval_set)) == (300, 40)
    _assert_disjoint(train, eval_set)
    _, same_eval = generate_train_eval(kind, 100, 40, seed=0, difficulty=2)
    assert same_eval == eval_set  # eval does not move when the training pool changes size


def test_small_kind_trains_on_what_is_left(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        train, eval_set = generate_train_eval("addition", 4000, 30, seed=0, difficulty=1)
    assert len(eval_set) == 30 and len(train) == 70  # 100 one-digit sums in all
    _assert_disjoint(train, eval_set)
    assert "training repeats them" in caplog.text
    with pytest.raises(ValueError, match="eval_count=200"):
        generate_train_eval("addition", 4000, 200, seed=0, difficulty=1)


def test_split_train_eval_dedupes_and_is_deterministic() -> None:
    questions = [Question(f"id-{i}", f"question {i}", str(i)) for i in range(50)]
    questions += [Question("id-3", "question 3", "3"),  # the same question again
                  Question("new-id", "question  7 ", "7")]  # same prompt up to whitespace
    train, eval_set = split_train_eval(questions, eval_count=10, seed=4)
    assert (len(train), len(eval_set)) == (40, 10)
    _assert_disjoint(train, eval_set)
    assert (train, eval_set) == split_train_eval(questions, eval_count=10, seed=4)
    assert eval_set != split_train_eval(questions, eval_count=10, seed=5)[1]
    with pytest.raises(ValueError, match="50 distinct"):
        split_train_eval(questions, eval_count=50, seed=0)
    with pytest.raises(ValueError, match="the id 'id-3' names two different questions"):
        split_train_eval(questions + [Question("id-3", "another text", "3")], eval_count=10, seed=4)


# ---------------------------------------------------------------- loading datasets

ROWS = [
    {"problem": "What is 1 + 1?", "final": "2", "uid": "a", "worked": "1 + 1 = 2. \\boxed{2}"},
    {"problem": "What is 2 + 2?", "final": "4", "uid": "b", "worked": None},
    {"problem": "What is 3 + 3?", "final": None, "uid": "c", "worked": None},  # no answer
    {"problem": "What is 4 + 4?", "final": "  ", "uid": "d", "worked": None},  # empty answer
    {"problem": "What is 5 + 5?", "final": "10", "uid": "e", "worked": None},
]
FIELDS = dict(question_field="problem", answer_field="final", id_field="uid", solution_field="worked")


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _save_to_disk(path: Path, rows: list[dict]) -> Path:
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def _write_parquet_shards(path: Path, rows: list[dict]) -> Path:
    path.mkdir()
    _write_parquet(path / "part-0.parquet", rows[:2])
    _write_parquet(path / "part-1.parquet", rows[2:])
    return path


WRITERS = {"jsonl": ("data.jsonl", _write_jsonl), "parquet": ("data.parquet", _write_parquet),
           "parquet_shards": ("shards", _write_parquet_shards), "save_to_disk": ("data_dir", _save_to_disk)}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_load_maps_fields_and_skips_bad_rows(fmt: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    name, write = WRITERS[fmt]
    path = write(tmp_path / name, ROWS)
    with caplog.at_level(logging.WARNING):
        loaded = load_dataset_questions(path, **FIELDS)
    assert [q.question_id for q in loaded.items] == ["a", "b", "e"]
    first = loaded.items[0]
    assert replace(first, columns=()) == Question("a", "What is 1 + 1?", "2", "1 + 1 = 2. \\boxed{2}")
    assert "problem" not in dict(first.columns) and dict(first.columns)["final"] == "2"  # the rest of the row, for rewards
    assert loaded.items[1].solution == ""
    assert loaded.skipped == 2
    assert loaded.skip_reasons == {"field 'final' is missing": 1, "field 'final' is empty": 1}
    assert "skipped 2 bad rows of 5" in caplog.text


@pytest.mark.parametrize("fmt, where", [("jsonl", "line 3"), ("parquet", "row 2"), ("parquet_shards", "row 2"),
                                        ("save_to_disk", "row 2")])
def test_fail_mode_names_the_row_and_field(fmt: str, where: str, tmp_path: Path) -> None:
    name, write = WRITERS[fmt]
    path = write(tmp_path / name, ROWS)
    with pytest.raises(BadRowError, match=f"{where}: field 'final' is missing"):
        load_dataset_questions(path, **FIELDS, on_bad_row="fail")


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_wrong_field_name_lists_the_columns(fmt: str, tmp_path: Path) -> None:
    name, write = WRITERS[fmt]
    path = write(tmp_path / name, ROWS)
    with pytest.raises(ValueError, match="question_field='question' is not a column .* problem, final, uid, worked"):
        load_dataset_questions(path, answer_field="final")


def test_jsonl_odd_lines_are_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "odd.jsonl"
    path.write_text('{"question": "q1", "answer": "1"}\n\nnot json\n[1, 2]\n{"question": "q2", "answer": 2}\n')
    loaded = load_dataset_questions(path)
    assert [(q.question_id, q.answer) for q in loaded.items] == [("odd-0", "1"), ("odd-3", "2")]
    assert loaded.skipped == 2
    with pytest.raises(BadRowError, match="line 3: the line is not valid JSON"):
        load_dataset_questions(path, on_bad_row="fail")


def test_dataset_dict_needs_a_split(tmp_path: Path) -> None:
    import datasets

    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(3)]
    splits = datasets.DatasetDict(train=datasets.Dataset.from_list(rows), test=datasets.Dataset.from_list(rows[:1]))
    splits.save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(ValueError, match="train, test; choose one with split=NAME"):
        load_dataset_questions(tmp_path / "splits")
    test = load_dataset_questions(tmp_path / "splits", split="test").items
    assert [q.question_id for q in test] == ["splits-test-0"]


def test_missing_or_unsupported_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset_questions(tmp_path / "nope.jsonl")
    (tmp_path / "data.csv").write_text("question,answer\nq,1\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        load_dataset_questions(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="neither a datasets save_to_disk folder"):
        load_dataset_questions(tmp_path)
    with pytest.raises(ValueError, match="single file with no splits"):
        load_dataset_questions(_write_jsonl(tmp_path / "d.jsonl", ROWS), split="train")
