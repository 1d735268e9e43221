"""The rollout pool: a run's rollout workers. Generations are dealt out and collected; a worker that
dies is replaced (an elastic extra dropped); the pool resizes between steps and grows onto nodes that
join the cluster. Every wait on a remote call is bounded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import ray

from innerloop.actors.rollout import RolloutWorker, worker_args
from innerloop.distributed.cluster.placement import Placement, alive_nodes, remote_class
from innerloop.distributed.cluster.watchdog import Locations, Watchdog
from innerloop.distributed.config import Config, SamplingConfig
from innerloop.distributed.errors import RunStopped
from innerloop.distributed.records import Question, Trajectory

log = logging.getLogger(__name__)


class WorkersLost(RunStopped):
    """Rollout workers died more often than recovery.max_worker_restarts allows."""


class RolloutPool:
    def __init__(self, cfg: Config, model_path: str, placement: Placement, watchdog: Watchdog,
                 locations: Locations, count: int):
        """Start `count` workers without waiting for them: the fleet waits for all its actors at once.
        `locations`: the fleet's actor name -> where its stacks are; the pool keeps its workers' current."""
        self.cfg, self._model_path, self._placement = cfg, model_path, placement
        self._watchdog, self._locations = watchdog, locations
        self.worker_restarts = 0
        self._events: list[dict] = []  # what happened to the workers since the driver last looked
        self.weights: CurrentWeights | None = None  # what a new worker loads first
        self.score_seconds = 0.0  # the slowest worker's reward scoring in the latest generation
        self._unchecked_loads: dict[int, "ray.ObjectRef"] = {}  # asynchronous weight loads, checked later
        self._known_nodes: set[str] = set(alive_nodes())  # cluster nodes already seen, for growing onto new ones
        self.shards: dict = {}  # worker handle -> processes of its engine (tensor-parallel shards)
        self.workers: list = [self._start_worker(i) for i in range(count)]

    def _start_worker(self, index: int, node_id: str | None = None):
        worker = remote_class(RolloutWorker, self._placement.rollout_options(index, node_id)).remote(
            *worker_args(self.cfg, self._model_path, self.cfg.train.seed + index))
        self.shards[worker] = self.cfg.rollout.tensor_parallel  # its engine's processes, as started
        return worker

    # ---- generations ----------------------------------------------------------------------------

    def generate(self, questions: list[Question], samples_per_question: int,
                 sampling: SamplingConfig | None = None, seed: int | None = None,
                 phase: str | None = None) -> list[Trajectory]:
        """Questions dealt round-robin to the workers; trajectories come back in question order.
        `phase`: the watchdog's name for the wait (default: generate, or eval for other sampling)."""
        return self.collect(self.submit(questions, samples_per_question, sampling, seed, phase))

    def submit(self, questions: list[Question], samples_per_question: int,
               sampling: SamplingConfig | None = None, seed: int | None = None,
               phase: str | None = None) -> "RolloutCall":
        """Start generating without waiting: each worker queues the call behind what it was already
        given (an earlier generation, a weight load), so it samples with the weights loaded by then.
        `seed` (one per step) makes each share's samples reproducible."""
        call = RolloutCall(questions, samples_per_question, sampling, seed, phase)
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
        phase = call.phase or ("generate" if call.sampling is None else "eval")
        self.check_loads(phase)  # they queue behind earlier generations: this phase's deadline
        by_question: dict[str, list[Trajectory]] = {}
        while call.pending:
            done, lost = self._settle(dict(enumerate(s.ref for s in call.pending)), phase, "generation")
            for rollout in done.values():
                for t in rollout.trajectories:
                    by_question.setdefault(t.question_id, []).append(t)
            if done:  # the slowest worker sets the pace: its scoring time is the step's
                self.score_seconds = max(r.score_seconds for r in done.values())
            redo = [call.pending[i] for i in lost]
            for share in redo:
                self._recover(share.slot, share.worker)
            call.pending = [self._share(call, min(s.slot, len(self.workers) - 1), s.questions, s.part) for s in redo]
        call.trajectories = [t for q in call.questions for t in by_question.pop(q.question_id, [])]
        return call.trajectories

    # ---- weights --------------------------------------------------------------------------------

    def check_loads(self, phase: str = "sync") -> None:
        """Weight loads not waited for (asynchronous sync) must have succeeded. A dead worker is not
        handled here: its queued generation fails too, and `collect` recovers it."""
        if self._unchecked_loads:
            loads, self._unchecked_loads = self._unchecked_loads, {}
            self._settle(loads, phase, "the weight sync")

    def start_loads(self, blob: "ray.ObjectRef", version: int) -> dict[int, "ray.ObjectRef"]:
        """Every worker starts loading `blob` (a weights blob in the object store), tagged `version`;
        a worker started from now on loads it before it is used."""
        self.weights = CurrentWeights(version, lambda: blob)
        return {i: w.load_weights.remote(blob, version) for i, w in enumerate(self.workers)}

    def finish_loads(self, loads: dict[int, "ray.ObjectRef"], wait: bool, learners_alive: Callable[[], None]) -> None:
        """wait=False (asynchronous sync): the loads queue behind running generations and are checked
        at the next `collect`. Else, after they settled, a worker whose load failed is recovered, holding
        these weights before it is used; `learners_alive()` first raises if the blob's maker died."""
        if not wait:
            self._unchecked_loads = loads
            return
        _, lost = self._settle(loads, "sync", "the weight sync")
        if lost:  # a load also fails when rank 0 died making the blob: that is the learner's loss
            learners_alive()
        self.recover([self.workers[i] for i in lost])  # a replacement loads these same weights before it is used

    def sleep(self) -> None:
        """Colocated: every engine frees its GPU for the update (a worker that died is recovered,
        awake, holding the current weights)."""
        self._each("sleep", (), "putting the rollout engines to sleep")

    def wake_up(self, tags: list[str]) -> None:
        """Colocated: every engine takes back its GPU memory for `tags` ("weights", "kv_cache")
        where it slept (a replacement started since is awake already)."""
        self._each("wake_up", (tags,), f"waking the rollout engines' {' and '.join(tags)}")

    def _each(self, method: str, args: tuple, what: str) -> None:
        calls = {i: getattr(w, method).remote(*args) for i, w in enumerate(self.workers)}
        _, lost = self._settle(calls, "sync", what)
        self.recover([self.workers[i] for i in lost])

    def recover(self, dead: list) -> None:
        """These workers (handles) died: each is replaced or dropped, as `collect` does."""
        for worker in dead:
            if worker in self.workers:
                self._recover(self.workers.index(worker), worker)

    # ---- failures -------------------------------------------------------------------------------

    def _settle(self, calls: dict[int, "ray.ObjectRef"], phase: str, what: str) -> tuple[dict, list[int]]:
        """Wait (bounded) for every call; results by worker index, and the workers that died."""
        self._watchdog.settle(list(calls.values()), phase, what)
        try:  # all finished: one fetch for them all (a get per worker costs the driver one round trip each)
            return dict(zip(calls, ray.get(list(calls.values()), timeout=0))), []
        except ACTOR_GONE:
            pass  # some died: read them one by one, to know which
        done, lost = {}, []
        for i, ref in calls.items():
            try:
                done[i] = ray.get(ref, timeout=0)
            except ACTOR_GONE as exc:
                log.warning("rollout worker %d died during %s: %s", i, what, first_line(exc))
                lost.append(i)
        return done, lost

    def _recover(self, slot: int, dead) -> None:
        """A worker died: a base worker is replaced; an elastic extra (its node likely gone) is dropped.
        A worker already handled for an earlier call of the same death is left alone."""
        if slot >= len(self.workers) or self.workers[slot] is not dead:
            return
        if slot >= self.cfg.rollout.workers:
            self.workers.pop(slot)
            kill(dead)
            self._forget_worker_location(slot)
            self._events.append({"event": "rollout_worker_dropped", "worker": slot, "workers": len(self.workers)})
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

    def _replace_worker(self, index: int) -> None:
        """A fresh worker in the dead one's place, holding the current weights before it is used."""
        limit = self.cfg.recovery.max_worker_restarts
        if self.worker_restarts >= limit:
            raise WorkersLost(f"rollout worker {index} died and {self.worker_restarts} workers were already "
                              f"replaced in this run (recovery.max_worker_restarts={limit}); stopping. The "
                              "last checkpoint is intact: look at the worker logs above, then --resume.")
        self.worker_restarts += 1
        kill(self.workers[index])
        started = time.perf_counter()
        (self.workers[index],), version = self._start_current_workers([index])
        event = {"event": "rollout_worker_replaced", "worker": index, "policy_version": version,
                 "restart_seconds": round(time.perf_counter() - started, 2), "replacements": self.worker_restarts}
        log.warning("rollout worker %d replaced in %.1f s; it holds policy version %d",
                    index, event["restart_seconds"], version)
        self._events.append(event)

    # ---- the pool's size ------------------------------------------------------------------------

    def _start_current_workers(self, indices, node_id: str | None = None) -> tuple[list, int]:
        """New rollout workers in these slots, up and holding the current weights before any use;
        returns them and the policy version they hold (0 before the first sync: the model folder's)."""
        workers = {f"rollout-{i}": self._start_worker(i, node_id) for i in indices}
        try:
            await_ready(self._watchdog, self._locations, workers)
            version = 0
            if self.weights is not None:
                version, blob = self.weights.version, self.weights.blob()
                self._watchdog.wait([w.load_weights.remote(blob, version) for w in workers.values()], "sync",
                                    f"loading the current weights into {', '.join(workers)}")
        except BaseException:  # none of them joins the pool: none may be left running
            for worker in workers.values():
                kill(worker)
                self.shards.pop(worker, None)
            raise
        return list(workers.values()), version

    def resize(self, count: int) -> None:
        """Grow or shrink the pool between steps; new workers hold the current weights first."""
        if self.cfg.rollout.colocate and count != len(self.workers):
            log.warning("a resize to %d rollout workers is ignored: colocated engines (rollout.colocate) are "
                        "one per learner rank, %d", count, len(self.workers))
            return
        before, started = len(self.workers), time.perf_counter()
        while len(self.workers) > count:
            index = len(self.workers) - 1
            worker = self.workers.pop()
            self._watchdog.settle([worker.close.remote()], "sync", f"closing rollout worker {index}")
            kill(worker)
            self._locations.pop(f"rollout-{index}", None)
        if count > len(self.workers):
            self.workers.extend(self._start_current_workers(range(len(self.workers), count))[0])
        self._events.append({"event": "rollout_workers_scaled", "from": before, "to": len(self.workers),
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
            try:
                self.workers.extend(self._start_current_workers(range(before, before + count), node)[0])
            except ACTOR_GONE as exc:  # the node left again while its workers started: go on without them
                self._events.append({"event": "rollout_workers_not_started", "reason": "node_left",
                                     "node": node, "workers": len(self.workers)})
                log.warning("a node that joined the cluster left before its rollout workers were up (%s); "
                            "going on with %d workers", first_line(exc), len(self.workers))
                continue
            seconds = round(time.perf_counter() - started, 2)
            self._events.append({"event": "rollout_workers_scaled", "from": before, "to": len(self.workers),
                                 "reason": "node_joined", "node": node, "seconds": seconds})
            log.info("a node joined the cluster: rollout workers %d -> %d in %.1f s", before, len(self.workers), seconds)

    def drain_events(self) -> list[dict]:
        """What happened to the workers (replaced, dropped, scaled) since the last call."""
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        """Close the engines cleanly where they answer, then kill every worker."""
        closing = []
        for worker in self.workers:
            try:
                closing.append(worker.close.remote())
            except Exception as exc:  # an actor Ray already forgot (it died): nothing to close
                log.debug("closing a rollout worker failed: %s", first_line(exc))
        ray.wait(closing, num_returns=len(closing), timeout=30)
        for worker in self.workers:
            kill(worker)


class CurrentWeights:
    """The policy version the engines hold, and how to get its blob for a newcomer: the object-store
    sync's own blob, or (after a streamed sync) one the learners publish when first asked."""

    def __init__(self, version: int, publish: Callable[[], "ray.ObjectRef"]):
        self.version, self._publish, self._blob = version, publish, None

    def blob(self) -> "ray.ObjectRef":
        if self._blob is None:
            self._blob = self._publish()
        return self._blob


class RolloutCall:
    """A generation submitted to the workers and not yet collected (or collected: `trajectories`)."""

    def __init__(self, questions: list[Question], samples_per_question: int, sampling, seed: int | None,
                 phase: str | None = None):
        self.questions, self.samples_per_question = questions, samples_per_question
        self.sampling, self.seed = sampling, seed
        self.phase = phase  # the watchdog's name for its wait; None: generate, or eval for other sampling
        self.pending: list[_Share] = []
        self.trajectories: list[Trajectory] | None = None


@dataclass(frozen=True)
class _Share:
    slot: int  # the worker's index in the pool
    part: int  # which share of the questions: fixes its seed, wherever it is redone
    questions: list[Question]
    worker: object  # the actor handle it was sent to (a replacement is a different handle)
    ref: object


def await_ready(watchdog: Watchdog, locations: Locations, named: dict[str, object]) -> None:
    """Wait (bounded) until every named actor is up; remember where each runs, for stack dumps."""
    where = watchdog.wait([a.location.remote() for a in named.values()], "start", f"starting {', '.join(named)}")
    locations.update(zip(named, where))


def named(role: str, actors: list) -> dict[str, object]:
    return {f"{role}-{i}": actor for i, actor in enumerate(actors)}


def kill(actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception as exc:  # an actor that already died needs no killing
        log.debug("kill failed: %s", exc)


# A call whose actor is gone: it died, or Ray's memory monitor killed it (that raises
# OutOfMemoryError, which is not a RayActorError, for the call it was running).
ACTOR_GONE = (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
