"""The SFT stage's teacher: one temporary rollout worker, closed before the training fleet starts
(the two need not fit in memory together)."""

from __future__ import annotations

import logging
import time

from innerloop.actors.rollout import RolloutWorker, worker_args
from innerloop.distributed.cluster.placement import remote_class, start_ray
from innerloop.distributed.cluster.rollout_pool import kill
from innerloop.distributed.cluster.watchdog import Watchdog
from innerloop.distributed.config import Config
from innerloop.distributed.records import Question, Trajectory

log = logging.getLogger(__name__)


def sample_with_teacher(cfg: Config, teacher_path: str, questions: list[Question], samples_per_question: int,
                        address: str | None = None) -> list[Trajectory]:
    """The teacher model's rollouts of each question, scored by the run's reward."""
    start_ray(address)
    gpus = cfg.rollout.gpus_per_worker
    teacher = remote_class(RolloutWorker, {"num_cpus": 1, **({"num_gpus": gpus} if gpus else {})}).remote(
        *worker_args(cfg, teacher_path, cfg.train.seed))
    watchdog = Watchdog(cfg.watchdog, dump_dir=None)
    try:
        started = time.perf_counter()
        rollout = watchdog.wait([teacher.generate.remote(questions, samples_per_question, None, cfg.train.seed)],
                                "generate", "the teacher's rollouts")[0]
        log.info("teacher sampled %d trajectories for %d questions in %.1f s", len(rollout.trajectories),
                 len(questions), time.perf_counter() - started)
        watchdog.settle([teacher.close.remote()], "sync", "closing the teacher")
        return list(rollout.trajectories)
    finally:
        kill(teacher)
