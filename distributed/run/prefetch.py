"""Asynchronous rollouts' pipeline: the driver takes each step's questions and generation from here."""

from __future__ import annotations

from innerloop.distributed.config import Config
from innerloop.distributed.run.questions import QuestionStream


def staleness_bound(cfg: Config) -> int:
    """How many policy versions a trajectory may lag the learner: 0 is the synchronous trainer."""
    return cfg.rollout.max_staleness if cfg.rollout.asynchronous else 0


class Prefetch:
    """The steps' generations, submitted up to the staleness bound ahead of the step being trained.

    With bound s, step t+s is submitted before step t's update, queued on each worker behind the
    weights of version t: so a step's trajectories are at most s versions old when trained on.
    s = 0 submits each step's generation only when that step starts: the synchronous trainer.
    """

    def __init__(self, rollouts, stream: QuestionStream, cfg: Config, step_seed, first_step: int):
        """`rollouts`: the fleet's rollout pool (submit, collect); `step_seed(step)`: a step's sampling seed."""
        self._rollouts, self._stream, self._cfg, self._step_seed = rollouts, stream, cfg, step_seed
        self._next_step = self.first_step = first_step
        self._submitted: list[tuple[list, object, int]] = []  # (questions, call, stream position before)

    def next(self) -> tuple[list, object]:
        """The next step's questions and its generation, after submitting those up to the bound."""
        rollout, last = self._cfg.rollout, self._cfg.total_steps
        while len(self._submitted) <= staleness_bound(self._cfg) and self._next_step < last:
            position = self._stream.position
            questions = self._stream.take(rollout.questions_per_step)
            call = self._rollouts.submit(questions, rollout.group_size, seed=self._step_seed(self._next_step))
            self._submitted.append((questions, call, position))
            self._next_step += 1
        questions, call, _ = self._submitted.pop(0)
        return questions, call

    def finish_submitted(self) -> None:
        """Wait for every submitted generation (before the pool changes); they stay queued, done."""
        for _, call, _ in self._submitted:
            self._rollouts.collect(call)

    def trained_position(self) -> int:
        """The question stream's position as of the last step trained: submitted steps not yet
        trained are generated again after a resume."""
        return self._submitted[0][2] if self._submitted else self._stream.position
