"""What a run's own step records call for: a warning when its groups stop carrying any signal, and a
stop at the first GRPO step when train.best_metric names nothing a step logs."""

from __future__ import annotations

import logging

from innerloop.distributed.config import Config
from innerloop.distributed.errors import RunStopped

log = logging.getLogger(__name__)

FLAT_SHARE = 0.9  # groups whose G rewards are all equal: advantage 0 everywhere, nothing to learn from
FLAT_STEPS = 3  # steps in a row before the warning


class StepWatch:
    def __init__(self, cfg: Config):
        self._best_metric = cfg.train.best_metric
        self._checked_metric = False
        self._flat_streak = 0

    def after_step(self, record: dict) -> None:
        if record.get("stage") != "grpo":
            return
        self._check_best_metric(record)
        flat = record.get("zero_variance_groups", 0.0)
        self._flat_streak = self._flat_streak + 1 if flat >= FLAT_SHARE else 0
        if self._flat_streak == FLAT_STEPS:
            log.warning(
                "for %d steps in a row %.0f%% or more of the groups had one reward for all their trajectories, so "
                "their advantages are 0 and they train nothing. Likely causes: the questions are too hard (all "
                "wrong) or too easy (all right) for the model (tasks.difficulty); a reward that ignores the "
                "answer; rollout.temperature too low for the samples to differ; rollout.max_tokens too short "
                "(truncated %.0f%% this step)", FLAT_STEPS, 100 * FLAT_SHARE, 100 * record.get("truncated", 0.0))

    def _check_best_metric(self, record: dict) -> None:
        if self._checked_metric:
            return
        self._checked_metric = True
        name = self._best_metric
        if name not in record and not name.startswith(("eval_", "probe_")):
            numbers = sorted(k for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
            raise RunStopped(f"train.best_metric={name!r} is not a number any step logs, so no checkpoint could be "
                             f"kept as the best. A step logs: {', '.join(numbers)} (and evals log eval_accuracy). "
                             "Set train.best_metric to one of them and --resume")
