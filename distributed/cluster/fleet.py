"""The fleet: every learner rank and rollout worker of a run, driven through typed calls.

Each call the driver makes is one method here, and every wait on a remote call is bounded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from innerloop.actors.rollout import RolloutWorker
from innerloop.distributed.config import Config, SamplingConfig
from innerloop.distributed.errors import RunStopped
from innerloop.distributed.cluster.placement import Placement, alive_nodes, remote_class, start_ray
from innerloop.distributed.records import Question, Trajectory, TrainingSample
from innerloop.distributed.cluster.watchdog import Locations, Watchdog
from innerloop.learners import grpo
from innerloop.learners.grpo import LossNormalizers
from innerloop.learners.learner import Learner

log = logging.getLogger(__name__)


class LearnerLost(RuntimeError):
    """A learner rank's process died: the ranks' shared state is gone, so all must restart."""


class WorkersLost(RunStopped):
    """Rollout workers died more often than recovery.max_worker_restarts allows."""


class Fleet:
    def __init__(self, cfg: Config, model_path: str, placement: Placement):
        self.cfg = cfg
        self._model_path = model_path
        self._placement = placement
        self.learners: list = []
        self.workers: list = []
        self._locations: Locations = {}  # actor name -> where its stacks are, for stack dumps
        self.watchdog = Watchdog(cfg.watchdog, dump_dir=None, locations=lambda: dict(self._locations))
        self.worker_restarts = 0
        self.events: list[dict] = []  # what happened to the actors since the driver last looked
        self._weights = None  # (version, object ref of rank 0's blob): what a replacement worker loads
        self.last_rollout_seconds = {"engine": 0.0, "score": 0.0}  # of the latest generate call
        self._unchecked_loads: dict[int, "ray.ObjectRef"] = {}  # asynchronous weight loads, checked later
        self._known_nodes: set[str] = set()  # cluster nodes already seen, for growing onto new ones

    @classmethod
    def start(cls, cfg: Config, model_path: str, address: str | None = None,
              rollout_workers: int | None = None) -> "Fleet":
        """Start Ray (or join `address`), then all learner ranks and rollout workers at once.

        `rollout_workers`: how many (default cfg.rollout.workers; 0 for a learners-only fleet).
        """
        start_ray(address)
        fleet = cls(cfg, model_path, Placement(cfg))
        fleet._known_nodes = set(alive_nodes())
        count = cfg.rollout.workers if rollout_workers is None else rollout_workers
        started = time.perf_counter()
        try:
            fleet.learners = fleet._start_learners()
            fleet.workers = [fleet._start_worker(i) for i in range(count)]
            fleet._await_ready({**_named("learner", fleet.learners), **_named("rollout", fleet.workers)})
        except BaseException:
            fleet.shutdown()
            raise
        log.info("%d rollout workers and %d learner ranks ready in %.1f s",
                 len(fleet.workers), len(fleet.learners), time.perf_counter() - started)
        return fleet

    # ---- starting actors ----------------------------------------------------------------------

    def _start_learners(self) -> list:
        cfg, (master, port) = self.cfg, self._placement.rendezvous()
        return [
            remote_class(Learner, self._placement.learner_options(rank)).remote(
                self._model_path, cfg.model.dtype, cfg.learner, cfg.algorithm, cfg.rollout.temperature,
                rank, cfg.learner.ranks, master, port, cfg.train.seed)
            for rank in range(cfg.learner.ranks)
        ]

    def _start_worker(self, index: int, node_id: str | None = None):
        cfg = self.cfg
        return remote_class(RolloutWorker, self._placement.rollout_options(index, node_id)).remote(
            self._model_path, cfg.model.dtype, cfg.rollout, cfg.reward, cfg.tasks.system_prompt,
            cfg.tasks.prompt_template, cfg.train.seed + index)

    def _await_ready(self, named: dict[str, object]) -> None:
        """Wait (bounded) until every named actor is up; remember where each runs, for stack dumps."""
        where = self.watchdog.wait([a.location.remote() for a in named.values()], "start",
                                   f"starting {', '.join(named)}")
        self._locations.update(zip(named, where))

    # ---- the step's calls -----------------------------------------------------------------------

    def generate(self, questions: list[Question], samples_per_question: int,
                 sampling: SamplingConfig | None = None, seed: int | None = None) -> list[Trajectory]:
        """Questions dealt round-robin to the workers; trajectories come back in question order."""
        return self.collect(self.submit(questions, samples_per_question, sampling, seed))

    def submit(self, questions: list[Question], samples_per_question: int,
               sampling: SamplingConfig | None = None, seed: int | None = None) -> "RolloutCall":
        """Start generating without waiting: each worker queues the call behind what it was already
        given (an earlier generation, a weight load), so it samples with the weights loaded by then.
        `seed` (one per step) makes each share's samples reproducible."""
        call = RolloutCall(questions, samples_per_question, sampling, seed)
        shares = [questions[i :: len(self.workers)] for i in range(len(self.workers))]
        call.pending = [self._share(call, i, share, i) for i, share in enumerate(shares) if share]
        return call

    def _share(self, call: "RolloutCall", slot: int, share: list[Question], part: int) -> "_Share":
        worker = self.workers[slot]
        seed = None if call.seed is None else call.seed + part
        return _Share(slot, part, share, worker,
                      worker.generate.remote(share, call.samples_per_question, call.sampling, seed))

    def collect(self, call: "RolloutCall") -> list[Trajectory]:
        """Wait (bounded) for a submitted generation. A worker that died mid-call is replaced (or,
        an elastic extra, dropped) and its share is generated again elsewhere, with the same seed."""
        if call.trajectories is not None:
            return call.trajectories
        phase = "generate" if call.sampling is None else "eval"
        self.check_loads(phase)  # they queue behind earlier generations: this phase's deadline
        by_question: dict[str, list[Trajectory]] = {}
        while call.pending:
            done, lost = self._settle(dict(enumerate(s.ref for s in call.pending)), phase, "generation")
            for rollout in done.values():
                for t in rollout.trajectories:
                    by_question.setdefault(t.question_id, []).append(t)
            if done:  # the slowest worker sets the pace: its engine and scoring times are the step's
                self.last_rollout_seconds = {"engine": max(r.engine_seconds for r in done.values()),
                                             "score": max(r.score_seconds for r in done.values())}
            redo = [call.pending[i] for i in lost]
            for share in redo:
                self._recover(share.slot, share.worker)
            call.pending = [self._share(call, min(s.slot, len(self.workers) - 1), s.questions, s.part) for s in redo]
        call.trajectories = [t for q in call.questions for t in by_question.pop(q.question_id, [])]
        return call.trajectories

    def _recover(self, slot: int, dead) -> None:
        """A worker died: a base worker is replaced; an elastic extra (its node likely gone) is dropped.
        A worker already handled for an earlier call of the same death is left alone."""
        if slot >= len(self.workers) or self.workers[slot] is not dead:
            return
        if slot >= self.cfg.rollout.workers:
            self.workers.pop(slot)
            _kill(dead)
            self._forget_worker_location(slot)
            self.events.append({"event": "rollout_worker_dropped", "worker": slot, "workers": len(self.workers)})
            log.warning("elastic rollout worker %d died; going on with %d workers", slot, len(self.workers))
        else:
            self._replace_worker(slot)

    def _forget_worker_location(self, slot: int) -> None:
        """The workers after `slot` move down one place; so do their recorded locations."""
        for index in range(slot, len(self.workers) + 1):
            moved = self._locations.pop(f"rollout-{index + 1}", None)
            self._locations.pop(f"rollout-{index}", None)
            if moved is not None:
                self._locations[f"rollout-{index}"] = moved

    def check_loads(self, phase: str = "sync") -> None:
        """Weight loads not waited for (asynchronous sync) must have succeeded. A dead worker is not
        handled here: its queued generation fails too, and `collect` recovers it."""
        if self._unchecked_loads:
            loads, self._unchecked_loads = self._unchecked_loads, {}
            self._settle(loads, phase, "the weight sync")

    def update(self, samples: list[TrainingSample], normalizers: LossNormalizers) -> dict[str, float]:
        """One optimizer step on every rank; metrics summed over ranks, then made into means."""
        per_rank = self._learner_call([l.update.remote(samples, normalizers) for l in self.learners],
                                      "update", "the policy update")
        return reduce_update_metrics(per_rank)

    def sft_update(self, samples: list[TrainingSample], normalizer: float) -> dict[str, float]:
        """One supervised (negative log-likelihood) optimizer step on every rank."""
        per_rank = self._learner_call([l.sft_update.remote(samples, normalizer) for l in self.learners],
                                      "update", "the SFT update")
        return reduce_update_metrics(per_rank)

    def probe(self, trajectories: list[Trajectory], questions: list[Question], suffix_template: str,
              every: int) -> list:
        """Inner-loop curves of the trajectories under the learner's current weights (rank 0's)."""
        ref = self.learners[0].probe.remote(trajectories, questions, suffix_template, every)
        return self._learner_call([ref], "update", "the inner-loop probe")[0]

    def sync_weights(self, version: int, wait: bool = True) -> float:
        """Every rollout engine gets exactly the learner's current weights, tagged `version`.

        wait=False (asynchronous rollouts): the loads queue behind the workers' running generations
        and are checked at the next `collect`; only the learners' side is waited for.
        """
        started = time.perf_counter()
        self.check_loads()
        blobs = [l.weights_blob.remote() for l in self.learners]  # all ranks: ZeRO-3 gathers together
        # The workers take rank 0's blob straight from the object store: it never passes the driver.
        loads = {i: w.load_weights.remote(blobs[0], version) for i, w in enumerate(self.workers)}
        self._weights = (version, blobs[0])
        if not wait:
            self._learner_call(blobs, "sync", "gathering the weights")
            self._unchecked_loads = loads
            return time.perf_counter() - started
        self.watchdog.settle(blobs + list(loads.values()), "sync", "the weight sync")
        self._learner_call(blobs[1:], "sync", "gathering the weights")  # other ranks return None
        _, lost = self._settle(loads, "sync", "the weight sync")
        if lost:  # a load also fails when rank 0 died making the blob: that is the learner's loss
            self._learner_call([l.ready.remote() for l in self.learners], "sync", "checking the learners")
        for i in sorted(lost, reverse=True):
            self._recover(i, self.workers[i])  # a replacement loads these same weights before it is used
        return time.perf_counter() - started

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

    # ---- failures -------------------------------------------------------------------------------

    def _learner_call(self, refs: list, phase: str, what: str) -> list:
        try:
            return self.watchdog.wait(refs, phase, what)
        except ray.exceptions.RayActorError as exc:
            raise LearnerLost(f"a learner rank died during {what}: {_first_line(exc)}") from None

    def _settle(self, calls: dict[int, "ray.ObjectRef"], phase: str, what: str) -> tuple[dict, list[int]]:
        """Wait (bounded) for every call; results by worker index, and the workers that died."""
        self.watchdog.settle(list(calls.values()), phase, what)
        done, lost = {}, []
        for i, ref in calls.items():
            try:
                done[i] = ray.get(ref, timeout=0)
            except ray.exceptions.RayActorError as exc:
                log.warning("rollout worker %d died during %s: %s", i, what, _first_line(exc))
                lost.append(i)
        return done, lost

    def _replace_worker(self, index: int) -> None:
        """A fresh worker in the dead one's place, holding the current weights before it is used."""
        limit = self.cfg.recovery.max_worker_restarts
        if self.worker_restarts >= limit:
            raise WorkersLost(f"rollout worker {index} died and {self.worker_restarts} workers were already "
                              f"replaced in this run (recovery.max_worker_restarts={limit}); stopping. The "
                              "last checkpoint is intact: look at the worker logs above, then --resume.")
        self.worker_restarts += 1
        _kill(self.workers[index])
        started = time.perf_counter()
        (self.workers[index],), version = self._start_current_workers([index])
        event = {"event": "rollout_worker_replaced", "worker": index, "policy_version": version,
                 "restart_seconds": round(time.perf_counter() - started, 2), "replacements": self.worker_restarts}
        log.warning("rollout worker %d replaced in %.1f s; it holds policy version %d",
                    index, event["restart_seconds"], version)
        self.events.append(event)

    def _start_current_workers(self, indices, node_id: str | None = None) -> tuple[list, int]:
        """New rollout workers in these slots, up and holding the current weights before any use;
        returns them and the policy version they hold (0 before the first sync: the model folder's)."""
        workers = {f"rollout-{i}": self._start_worker(i, node_id) for i in indices}
        self._await_ready(workers)
        version = 0
        if self._weights is not None:
            version, blob = self._weights
            self.watchdog.wait([w.load_weights.remote(blob, version) for w in workers.values()], "sync",
                               f"loading the current weights into {', '.join(workers)}")
        return list(workers.values()), version

    def restart_learners(self) -> None:
        """Every rank anew from the model folder (the caller then loads a checkpoint into them)."""
        for learner in self.learners:
            _kill(learner)
        self.learners = self._start_learners()
        self._await_ready(_named("learner", self.learners))
        self._weights = None

    def resize_workers(self, count: int) -> None:
        """Grow or shrink the rollout pool between steps; new workers hold the current weights first."""
        before, started = len(self.workers), time.perf_counter()
        while len(self.workers) > count:
            index = len(self.workers) - 1
            worker = self.workers.pop()
            self.watchdog.settle([worker.close.remote()], "sync", f"closing rollout worker {index}")
            _kill(worker)
            self._locations.pop(f"rollout-{index}", None)
        if count > len(self.workers):
            self.workers.extend(self._start_current_workers(range(len(self.workers), count))[0])
        self.events.append({"event": "rollout_workers_scaled", "from": before, "to": len(self.workers),
                            "seconds": round(time.perf_counter() - started, 2)})
        log.info("rollout workers: %d -> %d in %.1f s", before, len(self.workers), time.perf_counter() - started)

    def grow_onto_new_nodes(self, max_workers: int) -> None:
        """Start rollout workers on nodes that joined the cluster since the last look, as many as
        fit on each, until the pool holds `max_workers`. They hold the current weights first."""
        nodes = alive_nodes()
        joined = [node for node in nodes if node not in self._known_nodes]
        self._known_nodes = set(nodes)
        for node in joined:
            count = min(max_workers - len(self.workers), self._placement.workers_that_fit(nodes[node]))
            if count <= 0:
                continue
            before, started = len(self.workers), time.perf_counter()
            self.workers.extend(self._start_current_workers(range(before, before + count), node)[0])
            seconds = round(time.perf_counter() - started, 2)
            self.events.append({"event": "rollout_workers_scaled", "from": before, "to": len(self.workers),
                                "reason": "node_joined", "node": node, "seconds": seconds})
            log.info("a node joined the cluster: rollout workers %d -> %d in %.1f s", before, len(self.workers), seconds)

    def drain_events(self) -> list[dict]:
        events, self.events = self.events, []
        return events

    def shutdown(self) -> None:
        """Close the engines cleanly where they answer, then kill every actor."""
        closing = [w.close.remote() for w in self.workers]
        ray.wait(closing, num_returns=len(closing), timeout=30)
        for actor in self.workers + self.learners:
            _kill(actor)


class RolloutCall:
    """A generation submitted to the workers and not yet collected (or collected: `trajectories`)."""

    def __init__(self, questions: list[Question], samples_per_question: int, sampling, seed: int | None):
        self.questions, self.samples_per_question = questions, samples_per_question
        self.sampling, self.seed = sampling, seed
        self.pending: list[_Share] = []
        self.trajectories: list[Trajectory] | None = None


@dataclass(frozen=True)
class _Share:
    slot: int  # the worker's index in the pool
    part: int  # which share of the questions: fixes its seed, wherever it is redone
    questions: list[Question]
    worker: object  # the actor handle it was sent to (a replacement is a different handle)
    ref: object


def sample_with_teacher(cfg: Config, teacher_path: str, questions: list[Question], samples_per_question: int,
                        address: str | None = None) -> list[Trajectory]:
    """A teacher model's rollouts, scored by the run's reward: one temporary rollout worker holding
    the teacher, closed before the training fleet starts (the two need not fit in memory together)."""
    start_ray(address)
    gpus = cfg.rollout.gpus_per_worker
    teacher = remote_class(RolloutWorker, {"num_cpus": 1, **({"num_gpus": gpus} if gpus else {})}).remote(
        teacher_path, cfg.model.dtype, cfg.rollout, cfg.reward, cfg.tasks.system_prompt, cfg.tasks.prompt_template,
        cfg.train.seed)
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
        _kill(teacher)


def _named(role: str, actors: list) -> dict[str, object]:
    return {f"{role}-{i}": actor for i, actor in enumerate(actors)}


def _kill(actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception as exc:  # an actor that already died needs no killing
        log.debug("kill failed: %s", exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def reduce_update_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Additive loss metrics are summed over ranks; the rest are the same on every rank (rank 0's)."""
    shared = {"grad_norm", "learning_rate", "update_seconds", "reference_seconds", "step_skipped"}
    summed = grpo.sum_metrics([{k: v for k, v in r.items() if k not in shared} for r in per_rank])
    out = grpo.finalize_metrics(summed)
    if "sampler_gap_sum" in out:  # GRPO updates; SFT has no sampler
        out["sampler_logprob_gap"] = out.pop("sampler_gap_sum") / max(out["tokens"], 1.0)
    return {**out, **{k: per_rank[0][k] for k in shared if k in per_rank[0]}}  # SFT has no reference
