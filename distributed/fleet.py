"""The fleet: every learner rank and rollout worker of a run, driven through typed calls.

Each call the driver makes is one method here, and every wait on a remote call is bounded.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import ray

from innerloop.actors.rollout import RolloutWorker
from innerloop.distributed.config import Config, SamplingConfig
from innerloop.distributed.placement import Placement, free_port, remote_class, start_ray
from innerloop.distributed.records import Question, Trajectory, TrainingSample
from innerloop.learners import grpo
from innerloop.learners.grpo import LossNormalizers
from innerloop.learners.learner import Learner

log = logging.getLogger(__name__)

# Generous bounds: a phase that overruns these is hung, not slow (2 cores, 135M model).
START_TIMEOUT_S = 900.0
PHASE_TIMEOUT_S = 3600.0


def wait(refs, what: str, timeout: float = PHASE_TIMEOUT_S):
    """ray.get with a bound and an error that says which phase stalled."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"{what} did not finish within {timeout:.0f} s; the job is stopped rather "
                           "than left hanging. Check the actor logs above.") from None


class Fleet:
    def __init__(self, cfg: Config, learners: list, workers: list):
        self.cfg = cfg
        self.learners = learners
        self.workers = workers

    @classmethod
    def start(cls, cfg: Config, model_path: str, address: str | None = None) -> "Fleet":
        """Start Ray (or join `address`), then all learner ranks and rollout workers at once."""
        start_ray(address)
        placement = Placement(cfg)
        started = time.perf_counter()
        master = ray.util.get_node_ip_address()
        port = free_port()
        learners = [
            remote_class(Learner, placement.learner_options(rank)).remote(
                model_path, cfg.model.dtype, cfg.learner, cfg.algorithm, cfg.rollout.temperature, rank,
                cfg.learner.ranks,
                master, port, cfg.train.seed)
            for rank in range(cfg.learner.ranks)
        ]
        workers = [
            remote_class(RolloutWorker, placement.rollout_options(i)).remote(
                model_path, cfg.model.dtype, cfg.rollout, cfg.reward, cfg.tasks.system_prompt,
                cfg.tasks.prompt_template, cfg.train.seed + i)
            for i in range(cfg.rollout.workers)
        ]
        fleet = cls(cfg, learners, workers)
        try:
            wait([w.ready.remote() for w in workers] + [l.ready.remote() for l in learners],
                 "starting the rollout workers and learners", START_TIMEOUT_S)
        except BaseException:
            fleet.shutdown()
            raise
        log.info("%d rollout workers and %d learner ranks ready in %.1f s",
                 len(workers), len(learners), time.perf_counter() - started)
        return fleet

    def generate(self, questions: list[Question], samples_per_question: int,
                 sampling: SamplingConfig | None = None) -> list[Trajectory]:
        """Questions dealt round-robin to the workers; trajectories come back in question order."""
        shares = [questions[i :: len(self.workers)] for i in range(len(self.workers))]
        refs = [w.generate.remote(share, samples_per_question, sampling)
                for w, share in zip(self.workers, shares) if share]
        results = wait(refs, "generation")
        by_question = {}
        for trajectories in results:
            for t in trajectories:
                by_question.setdefault(t.question_id, []).append(t)
        return [t for q in questions for t in by_question.pop(q.question_id, [])]

    def update(self, samples: list[TrainingSample], normalizers: LossNormalizers) -> dict[str, float]:
        """One optimizer step on every rank; metrics summed over ranks, then made into means."""
        per_rank = wait([l.update.remote(samples, normalizers) for l in self.learners], "the policy update")
        return reduce_update_metrics(per_rank)

    def sync_weights(self, version: int) -> float:
        """Every rollout engine gets exactly the learner's current weights, tagged `version`."""
        started = time.perf_counter()
        blobs = [l.weights_blob.remote() for l in self.learners]  # all ranks: ZeRO-3 gathers together
        loads = [w.load_weights.remote(blobs[0], version) for w in self.workers]
        wait(loads + blobs[1:], "the weight sync")
        return time.perf_counter() - started

    def export(self, folder: Path) -> None:
        wait([l.export.remote(str(folder)) for l in self.learners], "exporting the final model")

    def save_learners(self, folder: Path, tag: str) -> None:
        wait([l.save_checkpoint.remote(str(folder), tag) for l in self.learners], "the checkpoint")

    def load_learners(self, folder: Path, tag: str) -> None:
        wait([l.load_checkpoint.remote(str(folder), tag) for l in self.learners], "loading the checkpoint")

    def shutdown(self) -> None:
        """Close the engines cleanly where they answer, then kill every actor."""
        closing = [w.close.remote() for w in self.workers]
        ray.wait(closing, num_returns=len(closing), timeout=30)
        for actor in self.workers + self.learners:
            try:
                ray.kill(actor)
            except Exception as exc:  # an actor that already died needs no killing
                log.debug("kill failed: %s", exc)


def reduce_update_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Additive loss metrics are summed over ranks; the rest are the same on every rank (rank 0's)."""
    shared = {"grad_norm", "learning_rate", "update_seconds"}
    summed = grpo.sum_metrics([{k: v for k, v in r.items() if k not in shared} for r in per_rank])
    out = grpo.finalize_metrics(summed)
    out["sampler_logprob_gap"] = out.pop("sampler_gap_sum") / max(out["tokens"], 1.0)
    return {**out, **{k: per_rank[0][k] for k in shared}}
