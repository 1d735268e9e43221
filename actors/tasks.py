"""Task data: a seeded synthetic question generator, a local dataset loader, and the train/eval split.

Synthetic questions have exact integer answers and a worked `solution` that ends in
`\\boxed{answer}` (usable as an SFT trajectory). A question's id is derived from its text
("addition-d2-3f9a1c0b2e"), so the same question always has the same id whatever the seed or count,
and the per-question history never splits one question across several ids.

Eval questions never appear in training: they are told apart by id and by prompt text.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
from pathlib import Path
from typing import Any, Callable, Literal

from innerloop.actors.rows import BadRowError, Loaded, Rows, field_text, jsonl_rows
from innerloop.actors.word_problems import MAX_WORD_STEPS, draw_word_problem
from innerloop.distributed.records import Question

logger = logging.getLogger(__name__)

SYNTHETIC_KINDS = ("addition", "arithmetic", "word", "mixed")

# A draw makes one (prompt, solution, answer); a kind whose draws keep repeating is exhausted.
_Draw = tuple[str, str, int]
_EXHAUSTED_AFTER = 2000  # consecutive draws with no new prompt


# ---------------------------------------------------------------- addition


_PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions")


def _operand(rng: random.Random, digits: int) -> int:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def _addition(rng: random.Random, difficulty: int) -> _Draw:
    a, b = _operand(rng, difficulty), _operand(rng, difficulty)
    prompt = f"What is {a} + {b}?"
    return prompt, _column_addition(a, b), a + b


def _column_addition(a: int, b: int) -> str:
    """Column addition with carries, right to left: the written method, one place per line."""
    lines, carry, place, x, y = [], 0, 0, a, b
    while x or y or place == 0:
        total = x % 10 + y % 10 + carry
        carried = f" + {carry} carried" if carry else ""
        carry_out = f", carry {total // 10}" if total >= 10 else ""
        lines.append(f"{_place(place)}: {x % 10} + {y % 10}{carried} = {total}, write {total % 10}{carry_out}.")
        x, y, carry, place = x // 10, y // 10, total // 10, place + 1
    if carry:
        lines.append(f"{_place(place)}: write the carried {carry}.")
    return "Add column by column from the right.\n" + "\n".join(lines) + f"\nSo {a} + {b} = {a + b}."


def _place(k: int) -> str:
    return _PLACES[k] if k < len(_PLACES) else f"10^{k} place"


# ---------------------------------------------------------------- arithmetic


def _arithmetic(rng: random.Random, difficulty: int) -> _Draw:
    numbers = [rng.randint(1, 20) for _ in range(difficulty + 1)]
    ops = [rng.choice("+-*") for _ in range(difficulty)]
    prompt = f"Compute {_render(numbers, ops)}."
    steps, value = _reduce_stepwise(numbers, ops)
    return prompt, "Multiplication comes before addition and subtraction.\n" + "\n".join(steps), value


def _render(numbers: list[int], ops: list[str]) -> str:
    parts = [str(numbers[0])]
    for op, n in zip(ops, numbers[1:]):
        parts += [op, str(n)]
    return " ".join(parts)


def _reduce_stepwise(numbers: list[int], ops: list[str]) -> tuple[list[str], int]:
    """Evaluate with precedence, one operation per step, showing what is left after each."""
    numbers, ops, steps = list(numbers), list(ops), []
    while ops:
        # The leftmost multiplication first; with none left, the leftmost + or -.
        k = ops.index("*") if "*" in ops else 0
        a, op, b = numbers[k], ops[k], numbers[k + 1]
        result = a * b if op == "*" else a + b if op == "+" else a - b
        numbers[k : k + 2], ops[k : k + 1] = [result], []
        rest = f", leaving {_render(numbers, ops)}" if ops else ""
        steps.append(f"{a} {op} {b} = {result}{rest}.")
    return steps, numbers[0]


# ---------------------------------------------------------------- the generator

_GENERATORS: dict[str, Callable[[random.Random, int], _Draw]] = {
    "addition": _addition,
    "arithmetic": _arithmetic,
    "word": draw_word_problem,
}


def _draw_question(kind: str, difficulty: int, seed: int, stream: str, i: int) -> Question:
    # One RNG per draw, seeded by a string (hashed with SHA-512, independent of PYTHONHASHSEED):
    # draw i is the same whatever the count, so a longer run extends a shorter one.
    rng = random.Random(f"{kind}|{difficulty}|{seed}|{stream}|{i}")
    sub_kind = rng.choice(sorted(_GENERATORS)) if kind == "mixed" else kind
    prompt, work, answer = _GENERATORS[sub_kind](rng, difficulty)
    solution = f"{work}\nThe answer is \\boxed{{{answer}}}"
    digest = hashlib.sha1(prompt.encode()).hexdigest()[:10]
    return Question(f"{sub_kind}-d{difficulty}-{digest}", prompt, str(answer), solution)


def _draw_distinct(kind: str, count: int, seed: int, difficulty: int, stream: str = "",
                   exclude: frozenset[str] = frozenset()) -> list[Question]:
    """Up to `count` questions with distinct prompts not in `exclude`; fewer if the kind runs out."""
    _check_kind(kind, difficulty, count)
    seen, out, misses, i = set(exclude), [], 0, 0
    while len(out) < count and misses < _EXHAUSTED_AFTER:
        q = _draw_question(kind, difficulty, seed, stream, i)
        i += 1
        if q.prompt in seen:
            misses += 1
            continue
        seen.add(q.prompt)
        out.append(q)
        misses = 0
    return out


def _check_kind(kind: str, difficulty: int, count: int) -> None:
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"unknown synthetic task kind {kind!r}; choose one of: {', '.join(SYNTHETIC_KINDS)}")
    if difficulty < 1:
        raise ValueError(f"task difficulty must be >= 1, got {difficulty}")
    if kind in ("word", "mixed") and difficulty > MAX_WORD_STEPS:
        raise ValueError(f"word problems have at most {MAX_WORD_STEPS} steps; got difficulty {difficulty}")
    if count < 0:
        raise ValueError(f"question count must be >= 0, got {count}")


def generate_train_eval(kind: str, train_count: int, eval_count: int, seed: int,
                        difficulty: int) -> tuple[list[Question], list[Question]]:
    """Disjoint train and eval sets. Eval is its own seeded stream, so it stays the same when
    train_count changes; train skips every eval prompt.

    A small kind (1-digit addition has 100 questions) may give fewer train questions than asked:
    that is logged, since repeating questions is fine for training. Eval is never short.
    """
    eval_set = _draw_distinct(kind, eval_count, seed, difficulty, stream="eval")
    if len(eval_set) < eval_count:
        raise ValueError(f"{kind!r} at difficulty {difficulty} has only about {len(eval_set)} distinct "
                         f"questions, fewer than eval_count={eval_count}; lower eval_count or raise the difficulty")
    train = _draw_distinct(kind, train_count, seed, difficulty, exclude=frozenset(q.prompt for q in eval_set))
    if not train:
        raise ValueError(f"{kind!r} at difficulty {difficulty}: the {eval_count} eval questions use up every "
                         "question, leaving none to train on; lower eval_count or raise the difficulty")
    if len(train) < train_count:
        logger.warning("%r at difficulty %d has only %d distinct questions outside eval (asked for %d); "
                       "training repeats them", kind, difficulty, len(train), train_count)
    return train, eval_set


def _prompt_key(prompt: str) -> str:
    return " ".join(prompt.split())  # whitespace differences do not make a new question


def split_train_eval(questions: list[Question], eval_count: int, seed: int) -> tuple[list[Question], list[Question]]:
    """Dedupe by id and prompt text, then hold out `eval_count` at random (seeded); order is kept."""
    unique, ids, prompts = [], {}, set()
    for q in questions:
        key = _prompt_key(q.prompt)
        if ids.get(q.question_id, key) != key:  # one id, two questions: which one a record means is lost
            raise ValueError(f"the id {q.question_id!r} names two different questions ({ids[q.question_id][:60]!r} "
                             f"and {key[:60]!r}); give every question its own id (tasks.id_field)")
        if q.question_id in ids or key in prompts:
            continue
        ids[q.question_id] = key
        prompts.add(key)
        unique.append(q)
    if len(unique) < len(questions):
        logger.warning("dropped %d duplicate questions (same id or same prompt)", len(questions) - len(unique))
    if not 0 <= eval_count < len(unique):
        raise ValueError(f"eval_count={eval_count} must be between 0 and {len(unique) - 1}: there are "
                         f"{len(unique)} distinct questions and training needs at least one")
    held_out = set(random.Random(seed).sample(range(len(unique)), eval_count))
    train = [q for k, q in enumerate(unique) if k not in held_out]
    eval_set = [q for k, q in enumerate(unique) if k in held_out]
    return train, eval_set


# ---------------------------------------------------------------- local datasets


def load_dataset_questions(
    path: str | Path,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str | None = None,
    solution_field: str | None = None,
    on_bad_row: Literal["skip", "fail"] = "skip",
    split: str | None = None,
) -> Loaded[Question]:
    """Questions from a JSONL file, a Parquet file (or a folder of them), or a `save_to_disk` folder.

    A row without a question or an answer (or without its id, when `id_field` is set) is skipped and
    counted, or with on_bad_row="fail" stops the load naming the row. A missing solution is just "".
    Without `id_field`, ids are "<file stem>[-<split>]-<row>" (stable as long as the file is).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset path {str(path)!r} does not exist")
    columns, rows = _open_rows(path, split)
    wanted = {"question_field": question_field, "answer_field": answer_field,
              "id_field": id_field, "solution_field": solution_field}
    for setting, name in wanted.items():
        if name is not None and name not in columns:
            raise ValueError(f"{setting}={name!r} is not a column of {path}; its columns are: "
                             f"{', '.join(columns) or '(none found)'}")
    source = f"{path.stem}-{split}" if split else path.stem  # the id prefix when rows have no id
    parse = functools.partial(_row_to_question, source=source, question_field=question_field,
                              answer_field=answer_field, id_field=id_field, solution_field=solution_field)
    return Loaded.from_rows(path, rows, parse, on_bad_row)


def _row_to_question(index: int, row: Any, source: str, question_field: str, answer_field: str,
                     id_field: str | None, solution_field: str | None) -> Question:
    if not isinstance(row, dict):
        raise BadRowError(f"row is {type(row).__name__}, expected a JSON object")
    messages = _messages(row, question_field) if isinstance(row.get(question_field), list) else ()
    prompt = [text for role, text in messages if role == "user"][-1] if messages else _text(row, question_field)
    answer = _text(row, answer_field)
    question_id = _text(row, id_field) if id_field else f"{source}-{index}"
    solution = row.get(solution_field) if solution_field else None
    columns = tuple((k, v) for k, v in row.items() if k != question_field)  # what TRL rewards are passed
    return Question(question_id, prompt, answer, "" if solution is None else str(solution), messages, columns)


def _messages(row: dict[str, Any], name: str) -> tuple[tuple[str, str], ...]:
    """A conversational prompt (TRL's format: a list of {role, content}) as (role, content) turns."""
    from trl.data_utils import is_conversational

    turns = row[name]
    if not turns or not is_conversational({"prompt": turns}) or not all(
            isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in turns):
        raise BadRowError(f"field {name!r} is a list but not chat messages ({{'role': ..., 'content': ...}} each)")
    if not any(t["role"] == "user" for t in turns):
        raise BadRowError(f"field {name!r} holds no user message")
    return tuple((t["role"], t["content"]) for t in turns)


def _text(row: dict[str, Any], name: str) -> str:
    text = field_text(row, name).strip()
    if not text:
        raise BadRowError(f"field {name!r} is empty")
    return text


def _open_rows(path: Path, split: str | None) -> tuple[list[str], Rows]:
    """The column names and the rows of any supported source."""
    if split is not None and path.is_file():
        raise ValueError(f"split={split!r} given, but {path} is a single file with no splits; drop split")
    if path.is_file() and path.suffix == ".jsonl":
        rows = jsonl_rows(path)
        if rows and not any(isinstance(row, dict) for _, row in rows):  # the file, not a column, is wrong
            where, row = rows[0]
            why = row if isinstance(row, BadRowError) else f"a JSON {type(row).__name__}"
            raise ValueError(f"{path}: no line is a JSON object, one question per line ({where}: {why})")
        return list(dict.fromkeys(key for _, row in rows if isinstance(row, dict) for key in row)), rows
    return _datasets_rows(_load_with_datasets(path, split))


def _load_with_datasets(path: Path, split: str | None) -> Any:
    import datasets  # imported here: it costs ~1 s and only dataset runs need it

    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use a JSON Lines file named "
                             "*.jsonl, a .parquet file, or a folder written by datasets' save_to_disk")
        return datasets.Dataset.from_parquet(str(path))
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        return _pick_split(datasets.load_from_disk(str(path)), split, path)
    shards = sorted(str(p) for p in path.glob("*.parquet"))
    if shards and split is None:  # e.g. a downloaded dataset's data/ folder: one table in shards
        return datasets.Dataset.from_parquet(shards)
    raise ValueError(f"{path} is a folder but neither a datasets save_to_disk folder nor a folder of .parquet files")


def _pick_split(loaded: Any, split: str | None, path: Path) -> Any:
    if not hasattr(loaded, "keys"):  # a single Dataset
        if split is not None:
            raise ValueError(f"split={split!r} given, but {path} holds a single dataset; drop split")
        return loaded
    names = list(loaded.keys())
    if split is None and len(names) == 1:
        return loaded[names[0]]
    if split not in names:
        raise ValueError(f"{path} holds the splits {', '.join(names)}; choose one with split=NAME")
    return loaded[split]


def _datasets_rows(ds: Any) -> tuple[list[str], Rows]:
    return list(ds.column_names), ((f"row {i}", row) for i, row in enumerate(ds))
