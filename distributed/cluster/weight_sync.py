"""The streamed weight sync (rollout.sync: transfer), driven from the cluster side.

One transfer group holds learner rank 0 (rank 0, the sender) and every engine process of the pool
(each tensor-parallel shard a rank of its own, engine after engine: `rank_offsets`), so one broadcast per bucket reaches all of
them (distributed/transfer.py). A sync: every learner rank walks its parameters together (under
ZeRO-3 each one is gathered by all) while rank 0 broadcasts and every engine receives in place
through vLLM's weight-transfer calls; then each engine resets its prefix cache and takes the version.

The group is formed at the first sync and formed anew whenever the pool's members changed (a
replacement, a resize, a node that joined, restarted learners). A worker that joins between syncs
gets the current weights by the object store, as before (`CurrentWeights`: the learners publish a
blob only when a newcomer first asks). A member that dies mid-transfer makes the others' waits end
(at once where the dead one was their peer, else after rollout.sync_timeout_s); the sync then falls
back to the object store for the engines left without the new weights, the dead worker is recovered
as after any death, and the next sync forms a new group.
"""

from __future__ import annotations

import logging
from typing import Callable

import ray

from innerloop.distributed.cluster.placement import Placement
from innerloop.distributed.cluster.rollout_pool import ACTOR_GONE, CurrentWeights, RolloutPool, first_line
from innerloop.distributed.cluster.watchdog import Watchdog
from innerloop.distributed.config import Config
from innerloop.distributed.transfer import GroupAddress

log = logging.getLogger(__name__)


class StreamedSync:
    def __init__(self, cfg: Config, placement: Placement, watchdog: Watchdog):
        self._cfg, self._placement, self._watchdog = cfg, placement, watchdog
        self._members: tuple | None = None  # (learner rank 0, *workers) of the group formed; None: none
        self._pool_shards: dict = {}  # worker -> its engine's processes (the pool's record)

    def forget_group(self) -> None:
        """The next sync forms a new group (the learners were restarted)."""
        self._members = None

    def sync(self, learners: list, pool: RolloutPool, version: int, learner_call: Callable,
             publish: Callable[[], "ray.ObjectRef"]) -> None:
        """Every engine of `pool` ends with the learners' weights, tagged `version`.
        `learner_call(refs, phase, what)`: the fleet's bounded wait (a dead rank raises LearnerLost);
        `publish()`: rank 0's blob of the current weights, for newcomers and the fallback."""
        workers = list(pool.workers)
        self._pool_shards = pool.shards
        members = (learners[0], *workers)
        failed, lost = ([], []) if members == self._members else self._form(learners[0], workers, learner_call)
        if not failed and not lost:
            self._members = members
            failed, lost = self._stream(learners, workers, version, learner_call)
        pool.weights = CurrentWeights(version, publish)
        if failed or lost:
            self._members = None
            log.warning("the streamed weight sync reached %d of %d rollout workers; the rest get version %d "
                        "by the object store", len(workers) - len(failed) - len(lost), len(workers), version)
            self._fall_back(pool, failed, version)
            pool.recover(lost)

    def _form(self, sender, workers: list, learner_call: Callable) -> tuple[list, list]:
        rollout = self._cfg.rollout
        offsets = rank_offsets([self._shards(w) for w in workers])
        host, port = self._placement.rendezvous()
        timeout = min(rollout.sync_timeout_s, 0.5 * self._watchdog.deadline("sync"))
        address = GroupAddress(host, port, offsets[-1], int(rollout.sync_bucket_mb * 2**20),
                               timeout, rollout.transfer_backend)
        opening = sender.open_weight_stream.remote(address)
        joins = {w: w.join_weight_stream.remote(address.init_info(offset)) for w, offset in zip(workers, offsets)}
        return self._outcomes([opening], joins, learner_call, "forming the weight-transfer group")

    def _shards(self, worker) -> int:
        """The worker's engine processes, as it was started (a pool may mix widths after a resize)."""
        return self._pool_shards.get(worker, self._cfg.rollout.tensor_parallel)

    def _stream(self, learners: list, workers: list, version: int, learner_call: Callable) -> tuple[list, list]:
        info = self._meta(learners[0], learner_call).update_info()
        receives = {w: w.receive_weights.remote(info, version) for w in workers}
        sends = [learner.stream_weights.remote() for learner in learners]
        return self._outcomes(sends, receives, learner_call, "the streamed weight sync")

    def _meta(self, sender, learner_call: Callable):
        return learner_call([sender.weights_meta.remote()], "sync", "the weights' metadata")[0]

    def _outcomes(self, learner_refs: list, worker_refs: dict, learner_call: Callable,
                  what: str) -> tuple[list, list]:
        """Wait (bounded) for both ends; the workers whose call failed, and those that died. A
        learner rank that died raises (LearnerLost); one whose sending failed is only logged: the
        workers' outcomes say which engines lack the weights."""
        self._watchdog.settle(learner_refs + list(worker_refs.values()), "sync", what)
        try:
            learner_call(learner_refs, "sync", what)
        except ray.exceptions.RayTaskError as exc:
            log.warning("learner rank 0 failed in %s: %s", what, first_line(exc))
        try:  # all finished: one fetch for them all, not one round trip per worker
            ray.get(list(worker_refs.values()), timeout=0)
            return [], []
        except ray.exceptions.RayError:
            pass  # some died or failed: read them one by one, to know which
        failed, lost = [], []
        for worker, ref in worker_refs.items():
            try:
                ray.get(ref, timeout=0)
            except ACTOR_GONE as exc:
                log.warning("a rollout worker died during %s: %s", what, first_line(exc))
                lost.append(worker)
            except ray.exceptions.RayError as exc:
                log.warning("a rollout worker failed in %s: %s", what, first_line(exc))
                failed.append(worker)
        return failed, lost

    def _fall_back(self, pool: RolloutPool, failed: list, version: int) -> None:
        """The workers whose transfer failed (alive, partly updated) reload from the object store."""
        if not failed:
            return
        blob = pool.weights.blob()
        loads = {pool.workers.index(w): w.load_weights.remote(blob, version) for w in failed}
        pool.finish_loads(loads, wait=True, learners_alive=lambda: None)


class ColocatedSync(StreamedSync):
    """rollout.colocate: engine i takes learner rank i's weights on their shared GPU by CUDA IPC.

    Each rank hands out IPC handles of its own parameters (no copy where they are already in the
    engine's dtype), its engine wakes its weights, loads from the handles in place, then wakes its KV
    cache; the ranks drop the handles once every engine is done. Failures end as a streamed sync's
    do: the object store for an engine that failed, recovery for one that died."""

    def sync(self, learners: list, pool: RolloutPool, version: int, learner_call: Callable,
             publish: Callable[[], "ray.ObjectRef"]) -> None:
        workers = list(pool.workers)
        limit = int(self._cfg.rollout.sync_bucket_mb * 2**20)
        handles = learner_call([l.ipc_weight_handles.remote(limit) for l in learners], "sync",
                               "sharing the weights by CUDA IPC")
        try:
            pool.wake_up(["weights"])
            receives = {w: w.receive_ipc_weights.remote(h, version) for w, h in zip(workers, handles)}
            failed, lost = self._outcomes([], receives, learner_call, "the colocated weight sync")
        finally:
            learner_call([l.release_ipc_handles.remote() for l in learners], "sync", "releasing the IPC handles")
        pool.weights = CurrentWeights(version, publish)
        self._fall_back(pool, failed, version)
        pool.recover(lost)
        pool.wake_up(["kv_cache"])


def rank_offsets(shards: list[int]) -> list[int]:
    """Each engine's first rank in the transfer group (learner rank 0 is rank 0; an engine of k
    shards takes k consecutive ranks), then the group's size."""
    offsets = [1]
    for width in shards:
        offsets.append(offsets[-1] + width)
    return offsets
