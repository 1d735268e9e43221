"""Where a run's questions come from, and the order it takes them in."""

from __future__ import annotations

import logging
import random

from innerloop.actors import tasks
from innerloop.actors.prompts import model_length_limit, question_prompt_ids
from innerloop.distributed.config import Config, TaskConfig
from innerloop.distributed.records import Question

log = logging.getLogger(__name__)


def load_questions(cfg: TaskConfig, verify_answers: bool = False) -> tuple[list[Question], list[Question]]:
    """(training, held-out evaluation) questions; the two never share an id or a prompt.

    `verify_answers`: the reward compares answers with the math verifier, so a dataset question
    whose reference answer it cannot parse (it could never be solved) is skipped and counted, or
    stops the load under tasks.on_bad_row=fail.
    """
    if cfg.source == "synthetic":
        return tasks.generate_train_eval(cfg.kind, cfg.train_count, cfg.eval_count, cfg.seed, cfg.difficulty)
    loaded = tasks.load_dataset_questions(cfg.path, cfg.question_field, cfg.answer_field,
                                          id_field=cfg.id_field, on_bad_row=cfg.on_bad_row).items
    questions = _with_parsable_answers(loaded, cfg) if verify_answers else loaded
    train, held_out = tasks.split_train_eval(questions, cfg.eval_count, cfg.seed)
    if not train:
        raise ValueError(f"no training questions left after holding out {cfg.eval_count} for evaluation; "
                         "lower tasks.eval_count or add questions")
    return train, held_out


def _with_parsable_answers(questions: list[Question], cfg: TaskConfig) -> list[Question]:
    from innerloop.actors.rewards import answer_is_parsable

    bad = [q for q in questions if not answer_is_parsable(q.answer)]
    if not bad:
        return questions
    example = f"question {bad[0].question_id} has answer {bad[0].answer!r}"
    if cfg.on_bad_row == "fail":
        raise ValueError(f"{cfg.path}: the math verifier cannot parse {len(bad)} reference answers ({example}) "
                         "as mathematical values (words such as 'seven' are not); fix those rows, set "
                         "tasks.on_bad_row=skip to skip them, or use a custom reward")
    log.warning("%s: skipped %d questions whose reference answer the math verifier cannot parse (%s)",
                cfg.path, len(bad), example)
    unreadable = {q.question_id for q in bad}
    return [q for q in questions if q.question_id not in unreadable]


def fitting_prompts(questions: list[Question], cfg: Config, model_path: str, tokenizer) -> list[Question]:
    """The questions whose chat-templated prompt, in tokens, leaves the engine room to generate within
    rollout.max_model_len (capped at the model's positions); the others are skipped and counted, or
    stop the load naming the first under tasks.on_bad_row=fail. An engine never sees a prompt it refuses."""
    limit = model_length_limit(model_path, cfg.rollout.max_model_len)
    tasks_cfg = cfg.tasks
    lengths = {q.question_id: len(question_prompt_ids(tokenizer, q, tasks_cfg.system_prompt,
                                                      tasks_cfg.prompt_template)) for q in questions}
    long = [q for q in questions if lengths[q.question_id] >= limit]
    if not long:
        return questions
    example = f"question {long[0].question_id} is {lengths[long[0].question_id]} tokens as a prompt"
    what = (f"{len(long)} questions leave no room to generate within {limit} tokens "
            f"(rollout.max_model_len, capped at the model's positions): {example}")
    if tasks_cfg.on_bad_row == "fail":
        raise ValueError(f"{what}. Shorten those questions, raise rollout.max_model_len, or set "
                         "tasks.on_bad_row=skip to skip them")
    log.warning("skipped %s", what)
    return [q for q in questions if lengths[q.question_id] < limit]


class QuestionStream:
    """Epochs over the training questions, each in a fresh seeded order.

    The position is the whole state: the same seed and position give the same next questions.
    """

    def __init__(self, questions: list[Question], seed: int, position: int = 0):
        self._questions = questions
        self._seed = seed
        self.position = position
        self._cached_epoch, self._cached_order = -1, []

    def _order(self, epoch: int) -> list[int]:
        if self._cached_epoch != epoch:  # one shuffle per epoch, not one per question taken
            self._cached_order = list(range(len(self._questions)))
            random.Random(self._seed * 1_000_003 + epoch).shuffle(self._cached_order)
            self._cached_epoch = epoch
        return self._cached_order

    def take(self, count: int) -> list[Question]:
        """The next `count` distinct questions. Where an epoch ends inside a take, a question the new
        epoch repeats from the same take is passed over: a step's groups must be distinct questions."""
        size = len(self._questions)
        if count > size:
            raise ValueError(f"a step takes {count} questions but the training pool holds only {size}; "
                             "lower rollout.questions_per_step or add questions")
        taken, seen = [], set()
        while len(taken) < count:
            epoch, offset = divmod(self.position, size)
            question = self._questions[self._order(epoch)[offset]]
            self.position += 1
            if question.question_id not in seen:
                seen.add(question.question_id)
                taken.append(question)
        return taken
