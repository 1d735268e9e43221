"""The fleet: every learner rank of a run and its rollout pool, driven through typed calls.

Each call the driver makes on the learners is one method here; the rollout workers are `rollouts`
(cluster/rollout_pool.py). Every wait on a remote call is bounded.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import ray

from innerloop.distributed.cluster.placement import (Placement, check_fits, ranks_fit, remote_class, start_ray,
                                                     widest_node_gpus)
from innerloop.distributed.cluster.rollout_pool import ACTOR_GONE, RolloutPool, await_ready, first_line, kill, named
from innerloop.distributed.cluster.watchdog import Locations, Watchdog
from innerloop.distributed.cluster.weight_sync import ColocatedSync, StreamedSync
from innerloop.distributed.config import Config
from innerloop.distributed.records import Question, Trajectory, TrainingSample, UpdateMetrics
from innerloop.learners.grpo import LossNormalizers
from innerloop.learners.learner import Learner

log = logging.getLogger(__name__)


class LearnerLost(RuntimeError):
    """A learner rank's process died: the ranks' shared state is gone, so all must restart."""


class SnapshotLost(RuntimeError):
    """The learners' in-memory snapshot is gone (the node holding it died): the checkpoint is next."""


class Fleet:
    def __init__(self, cfg: Config, model_path: str, placement: Placement):
        self.cfg, self._model_path, self._placement = cfg, model_path, placement
        self.learners: list = []
        self.learner_ranks = cfg.learner.ranks  # as many as now run: `resize_learners` changes it in-job
        self.rollouts: RolloutPool | None = None
        self._locations: Locations = {}  # actor name -> where its stacks are, for stack dumps
        self.watchdog = Watchdog(cfg.watchdog, dump_dir=None, locations=lambda: dict(self._locations))
        self._streamed = (ColocatedSync if cfg.rollout.colocate else StreamedSync)(cfg, placement, self.watchdog)

    @classmethod
    def start(cls, cfg: Config, model_path: str, address: str | None = None,
              rollout_workers: int | None = None) -> "Fleet":
        """Start Ray (or join `address`), then all learner ranks and rollout workers at once.

        `rollout_workers`: how many (default cfg.rollout.workers; 0 for a learners-only fleet).
        """
        start_ray(address)
        check_fits(cfg, ray.cluster_resources(), joined=address is not None, widest=widest_node_gpus())
        fleet = cls(cfg, model_path, Placement(cfg))
        count = cfg.rollout.workers if rollout_workers is None else rollout_workers
        started = time.perf_counter()
        try:
            fleet.learners = fleet._start_learners()
            fleet.rollouts = RolloutPool(cfg, model_path, fleet._placement, fleet.watchdog, fleet._locations, count)
            await_ready(fleet.watchdog, fleet._locations,
                        {**named("learner", fleet.learners), **named("rollout", fleet.rollouts.workers)})
        except BaseException:
            fleet.shutdown()
            raise
        log.info("%d rollout workers and %d learner ranks ready in %.1f s",
                 len(fleet.rollouts.workers), len(fleet.learners), time.perf_counter() - started)
        return fleet

    def _start_learners(self) -> list:
        cfg, (master, port) = self.cfg, self._placement.rendezvous()
        return [
            remote_class(Learner, self._placement.learner_options(rank)).remote(
                self._model_path, cfg.model.dtype, cfg.learner, cfg.algorithm, cfg.rollout.temperature,
                rank, self.learner_ranks, master, port, cfg.train.seed)
            for rank in range(self.learner_ranks)
        ]

    # ---- the step's calls -----------------------------------------------------------------------

    def update(self, samples: list[TrainingSample], normalizers: LossNormalizers) -> UpdateMetrics:
        """One optimizer step on every rank; the ranks' metrics as one record. Colocated engines
        sleep first (the next weight sync wakes them)."""
        self._free_gpus()
        batch = self._shared(samples)
        per_rank = self._learner_call([l.update.remote(batch, normalizers) for l in self.learners],
                                      "update", "the policy update")
        return UpdateMetrics.over_ranks(per_rank)

    def sft_update(self, samples: list[TrainingSample], normalizer: float) -> UpdateMetrics:
        """One supervised (negative log-likelihood) optimizer step on every rank."""
        self._free_gpus()
        batch = self._shared(samples)
        per_rank = self._learner_call([l.sft_update.remote(batch, normalizer) for l in self.learners],
                                      "update", "the SFT update")
        return UpdateMetrics.over_ranks(per_rank)

    def _shared(self, samples: list[TrainingSample]):
        """The step's samples, serialized once for all ranks (Ray hands each rank the value) instead of
        once per rank: with many ranks that copy was the driver's largest per-step cost."""
        return ray.put(samples) if len(self.learners) > 1 else samples

    def _free_gpus(self) -> None:
        if self.cfg.rollout.colocate:
            self.rollouts.sleep()

    def probe(self, trajectories: list[Trajectory], questions: list[Question], suffix_template: str,
              every: int, other_question: int = 0) -> list:
        """Inner-loop curves of the trajectories under the learner's current weights (rank 0's), and
        `other_question` controls per question (learners/probe.py, `control_items`)."""
        ref = self.learners[0].probe.remote(trajectories, questions, suffix_template, every, other_question)
        return self._learner_call([ref], "update", "the inner-loop probe")[0]

    def sync_weights(self, version: int, wait: bool = True) -> float:
        """Every rollout engine gets exactly the learner's current weights, tagged `version`.

        rollout.sync transfer: streamed in buckets (cluster/weight_sync.py), or colocated by CUDA IPC
        from the rank on the same GPU. object_store, and every
        asynchronous sync: rank 0's blob through Ray's object store. wait=False (asynchronous
        rollouts): the loads queue behind the workers' running generations and are checked at the
        next `collect`; only the learners' side is waited for.
        """
        started = time.perf_counter()
        self.rollouts.check_loads()
        if self.cfg.rollout.sync == "transfer" and wait and not self.cfg.rollout.asynchronous:
            self._streamed.sync(self.learners, self.rollouts, version, self._learner_call, self._publish)
            return time.perf_counter() - started
        blobs = [l.weights_blob.remote() for l in self.learners]  # all ranks: ZeRO-3 gathers together
        # The workers take rank 0's blob straight from the object store: it never passes the driver.
        loads = self.rollouts.start_loads(blobs[0], version)
        if not wait:
            self._learner_call(blobs, "sync", "gathering the weights")
        else:
            self.watchdog.settle(blobs + list(loads.values()), "sync", "the weight sync")
            self._learner_call(blobs[1:], "sync", "gathering the weights")  # other ranks return None
        self.rollouts.finish_loads(loads, wait, learners_alive=self._check_learners)
        return time.perf_counter() - started

    def _publish(self) -> "ray.ObjectRef":
        """Rank 0's blob of the learners' current weights, once every rank has taken part."""
        blobs = [l.weights_blob.remote() for l in self.learners]
        self._learner_call(blobs[1:], "sync", "gathering the weights")
        self.watchdog.settle(blobs[:1], "sync", "publishing the weights")
        return blobs[0]

    def export(self, folder: Path) -> None:
        self._learner_call([l.export.remote(str(folder)) for l in self.learners], "checkpoint",
                           "exporting the model")

    def save_learners(self, folder: Path, tag: str) -> None:
        self._learner_call([l.save_checkpoint.remote(str(folder), tag) for l in self.learners], "checkpoint",
                           "the checkpoint")

    def load_learners(self, folder: Path, tag: str, saved_ranks: int | None = None) -> None:
        """`saved_ranks`: how many ranks wrote it; a different count now is resharded on load."""
        self._learner_call([l.load_checkpoint.remote(str(folder), tag, saved_ranks) for l in self.learners],
                           "checkpoint", "loading the checkpoint")

    # ---- in-job changes of the learners (distributed/run/elastic.py) -----------------------------

    def learner_fit_problems(self, ranks: int) -> list[str]:
        """Why `ranks` learner ranks would not fit this cluster beside the rollout workers (empty: they do)."""
        return ranks_fit(self.cfg, ranks, len(self.rollouts.workers), ray.cluster_resources())

    def resize_learners(self, ranks: int) -> None:
        """Every rank stopped, `ranks` started anew from the model folder (the caller loads a checkpoint)."""
        self.learner_ranks = ranks
        self.restart_learners()

    def snapshot_learners(self) -> tuple[list, int]:
        """Every rank's whole state now (learners/learner.py `snapshot`), kept in Ray's object store and
        owned by this process, so it outlives the ranks; never fetched here. (refs, bytes in all)."""
        calls = [l.snapshot.options(num_returns=2).remote() for l in self.learners]
        sizes = self._learner_call([size for size, _ in calls], "checkpoint", "the learners' in-memory snapshot")
        return [payload for _, payload in calls], sum(sizes)

    def restore_learners(self, payloads: list) -> None:
        """Load a snapshot of as many ranks as now run: each rank gets rank 0's files and its own.
        Raises ray.exceptions.ObjectLostError (or its kin) where the snapshot is gone with its node."""
        refs = [l.restore_snapshot.remote(payloads[0], *([payloads[rank]] if rank else []))
                for rank, l in enumerate(self.learners)]
        try:
            self._learner_call(refs, "checkpoint", "loading the in-memory snapshot")
        except ray.exceptions.ObjectLostError as exc:  # also its kin: owner died, reconstruction failed
            raise SnapshotLost(first_line(exc)) from None

    # ---- failures -------------------------------------------------------------------------------

    def _learner_call(self, refs: list, phase: str, what: str) -> list:
        try:
            return self.watchdog.wait(refs, phase, what)
        except ACTOR_GONE as exc:
            raise LearnerLost(f"a learner rank died during {what}: {first_line(exc)}") from None

    def _check_learners(self) -> None:  # any answer will do: it raises LearnerLost if a rank died
        self._learner_call([l.location.remote() for l in self.learners], "sync", "checking the learners")

    def restart_learners(self) -> None:
        """Every rank anew from the model folder (the caller then loads a checkpoint into them)."""
        for rank, learner in enumerate(self.learners):
            kill(learner)
            self._locations.pop(f"learner-{rank}", None)
        self.learners = self._start_learners()
        await_ready(self.watchdog, self._locations, named("learner", self.learners))
        self.rollouts.weights = None
        self._streamed.forget_group()

    def shutdown(self) -> None:
        """Close the engines cleanly where they answer, then kill every actor."""
        if self.rollouts is not None:
            self.rollouts.close()
        for learner in self.learners:
            kill(learner)
        # Killed actors cannot remove their stack files; those on this node are removed here.
        here = ray.get_runtime_context().get_node_id()
        for where in self._locations.values():
            if where.node_id == here and where.path:
                shutil.rmtree(os.path.dirname(where.path), ignore_errors=True)
