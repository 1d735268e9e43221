"""Learners that change while the run goes on: resized between steps, or restored after a rank dies.

Resizing (`innerloop scale RUN_DIR --learner-ranks N`, learner.rank_schedule): before a step, the
run checkpoints (unless that step's checkpoint is already on disk), stops every rank, starts N, loads
the checkpoint resharded through DeepSpeed's universal format (learners/learner.py) and pushes the
loaded weights to the engines: the same path as resuming on another number of ranks, without
stopping the job. `learner_ranks_scaled` in metrics.jsonl has the seconds of each part. A count
the config or the cluster cannot take is refused before anything stops (`learner_ranks_refused`).

Snapshots (recovery.learner_snapshot): after every step each rank hands the driver its whole
state as the bytes of a DeepSpeed checkpoint, kept in Ray's object store; when a rank dies, the
restarted ranks load that copy, so no step is redone. When the copy is gone (the node that held it
died) or was taken by another number of ranks, the last checkpoint is loaded instead.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from innerloop.distributed.config import ConfigError
from innerloop.distributed.run.scale_command import check_learner_ranks
from innerloop.distributed.state import checkpoints

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """The learners' state after `state.step`, held in the object store, and the driver's at that step."""
    state: checkpoints.DriverState
    payloads: list  # one object ref per rank (the rank's files), owned by the driver
    ranks: int
    bytes: int
    seconds: float


def take_snapshot(actors, state: checkpoints.DriverState) -> Snapshot:
    started = time.perf_counter()
    payloads, size = actors.snapshot_learners()
    return Snapshot(state, payloads, actors.learner_ranks, size, time.perf_counter() - started)


def restore_snapshot(actors, snapshot: Snapshot | None) -> str | None:
    """Load `snapshot` into freshly restarted ranks; why it could not be used (None: it was)."""
    from innerloop.distributed.cluster.fleet import SnapshotLost

    if snapshot is None:
        return "no snapshot taken yet"
    if snapshot.ranks != actors.learner_ranks:
        return f"the snapshot was taken by {snapshot.ranks} ranks, {actors.learner_ranks} run now"
    try:
        actors.restore_learners(snapshot.payloads)
    except SnapshotLost as exc:
        actors.restart_learners()  # ranks that did get their files may wait in a collective for the rest
        return f"the snapshot is gone ({exc})"
    return None


def ranks_problem(cfg, actors, ranks: int) -> str | None:
    """Why the run cannot go on with `ranks` learner ranks (None: it can)."""
    try:
        check_learner_ranks(cfg, ranks)
    except ConfigError as exc:
        return str(exc)
    problems = actors.learner_fit_problems(ranks)
    return "; ".join(problems) if problems else None


def resize(cfg, actors, root, step: int, ranks: int, write_checkpoint) -> dict:
    """Checkpoint at `step` (`write_checkpoint()`, unless it is on disk under `root`), restart the
    learners as `ranks`, load it resharded, weights out. Returns the event to log (a refusal's where
    `ranks` cannot run: then nothing changed)."""
    before = actors.learner_ranks
    problem = ranks_problem(cfg, actors, ranks)
    if problem is not None:
        log.warning("learner ranks stay %d: %s", before, problem)
        return {"event": "learner_ranks_refused", "from": before, "to": ranks, "reason": problem}
    seconds, started = {}, time.perf_counter()
    folder = None
    if step > 0:  # at step 0 nothing has trained: the new ranks start from the model folder as the old did
        if checkpoints.saved_model(root, step) is None:
            write_checkpoint()
        folder = checkpoints.saved_model(root, step).parent
    seconds["checkpoint"] = time.perf_counter() - started
    actors.resize_learners(ranks)
    seconds["restart"] = time.perf_counter() - started - sum(seconds.values())
    if folder is not None:
        checkpoints.load(folder, actors)  # written by `before` ranks: resharded on the way in
    seconds["load"] = time.perf_counter() - started - sum(seconds.values())
    actors.sync_weights(step)  # the same weights; a worker replaced from now on gets them too
    seconds["sync"] = time.perf_counter() - started - sum(seconds.values())
    total = time.perf_counter() - started
    log.info("learner ranks: %d -> %d in %.1f s (%s)", before, ranks, total,
             ", ".join(f"{part} {s:.1f} s" for part, s in seconds.items()))
    return {"event": "learner_ranks_scaled", "from": before, "to": ranks, "seconds": round(total, 2),
            **{f"{part}_seconds": round(s, 2) for part, s in seconds.items()}}
