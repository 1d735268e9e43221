"""The SFT stage of a run (sft.steps > 0): the trajectories it imitates and each step's batch.

The set is built once, from the task generator's solutions, a trajectory file or a teacher's
rollouts, filtered by the verifier to k distinct correct trajectories per question, and written to
run_dir/sft_trajectories.jsonl. A resumed run reads that file back, so it trains on the very same
set (a teacher would not sample the same trajectories twice). Step s takes the next
sft.questions_per_step questions of a seeded order, all k trajectories of each: every question is
seen equally often, and a step's batch depends only on the seed and s.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from innerloop.distributed.config import Config
from innerloop.distributed.records import Question, TrainingSample
from innerloop.distributed.run.sft_data import (
    SftTrajectory, answer_verifier, build_sft_set, group_by_question, load_trajectory_file, sft_samples,
    solution_trajectories, teacher_trajectories, write_trajectory_file)

log = logging.getLogger(__name__)

SET_FILE = "sft_trajectories.jsonl"


class SftStageError(ValueError):
    """The SFT stage has nothing to train on; the message says why and what to change."""


def prepare_set(cfg: Config, train_questions: list[Question], run_dir: Path, sample_teacher) -> list[SftTrajectory]:
    """The stage's trajectories: the run's saved set if it has one, else built and saved.

    `sample_teacher(questions, samples_per_question)`: the teacher's rollouts (only for source teacher).
    """
    saved = run_dir / SET_FILE
    if saved.is_file():
        return load_trajectory_file(saved, on_bad_row="fail").items
    candidates = _candidates(cfg, train_questions, sample_teacher)
    built = build_sft_set(group_by_question(candidates), cfg.sft.distinct, cfg.train.seed,
                          answer_verifier(cfg.reward.answer_pattern), rows=cfg.sft.rows)
    if not built.items:
        raise SftStageError(f"the SFT stage found no trajectory the verifier accepts among {len(candidates)} "
                            f"from sft.source={cfg.sft.source}; check the source's answers or the reward's "
                            "answer format")
    log.info("SFT set: %d questions x %d rows of up to %d distinct trajectories (%d questions without a correct "
             "one dropped; distinct per question %s)", built.questions_kept, built.rows, built.k,
             built.questions_dropped, built.distinct_per_question)
    write_trajectory_file(saved, built.items)
    return list(built.items)


def _candidates(cfg: Config, train_questions: list[Question], sample_teacher) -> list[SftTrajectory]:
    sft = cfg.sft
    if sft.source == "solutions":
        return solution_trajectories(train_questions)
    if sft.source == "file":
        return load_trajectory_file(sft.path, on_bad_row=cfg.tasks.on_bad_row).items  # skipped lines are logged
    # A teacher samples only the questions the stage can reach: steps x questions per step.
    wanted = train_questions[: sft.steps * sft.questions_per_step]
    return teacher_trajectories(sample_teacher(wanted, sft.teacher_samples), wanted)


class SftSchedule:
    """Which trajectories each SFT step trains on: whole questions (k trajectories each), epochs
    over the set's questions in a fresh seeded order each."""

    def __init__(self, items: list[SftTrajectory], cfg: Config, tokenizer):
        self._cfg, self._tokenizer = cfg, tokenizer
        self._by_question: dict[str, list[SftTrajectory]] = group_by_question(items)
        self._ids = list(self._by_question)
        if len(self._ids) < cfg.sft.questions_per_step:
            raise SftStageError(f"the SFT set holds {len(self._ids)} questions, fewer than sft.questions_per_step="
                                f"{cfg.sft.questions_per_step}; lower it or give the stage more questions")

    def batch(self, step: int) -> tuple[list[str], list[TrainingSample]]:
        """The question ids and training samples of SFT step `step` (0-based)."""
        per_step = self._cfg.sft.questions_per_step
        ids = [self._question_at(step * per_step + i) for i in range(per_step)]
        items = [item for question_id in ids for item in self._by_question[question_id]]
        tasks = self._cfg.tasks
        return ids, sft_samples(items, self._tokenizer, tasks.system_prompt, tasks.prompt_template)

    def _question_at(self, index: int) -> str:
        epoch, offset = divmod(index, len(self._ids))
        order = list(self._ids)
        random.Random(f"{self._cfg.train.seed}-sft-{epoch}").shuffle(order)
        return order[offset]
