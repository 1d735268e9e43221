"""Deadlines for every wait on a remote call, and a stack dump of the whole job when one is overrun.

The driver waits on remote calls only through `Watchdog.wait`: `ray.get` with a timeout, never
without one. The deadline of a phase ("generate", "update", "sync", "checkpoint", "eval"; any other
name, e.g. "start", gets the adaptive rule with no fixed override) is, first match wins:

- `watchdog.<phase>_s` when the config sets it: a fixed number of seconds;
- `watchdog.first_s` while the phase has no recorded duration: first calls include warm-up
  (loading, compiling, allocating), so their durations say little about later ones;
- otherwise max(`watchdog.floor_s`, `watchdog.factor` x the slowest of the phase's last
  `watchdog.history` durations): a phase may legitimately slow down a little (longer completions),
  not by a factor of five.

`watchdog.enabled: false` switches the deadlines off but keeps a hard bound of 24 h
(`DISABLED_BOUND_S`): even then nothing waits forever.

On an overrun the watchdog writes one text file holding the driver's stacks and then every actor's,
and raises `PhaseStalled`, whose message says where the file is and what to change. Actors' stacks
come from `faulthandler`, which each actor registers on SIGUSR1 at start (`install_stack_dump`, distributed/stacks.py): its
handler writes the Python stacks of all threads from C, so it answers even when every thread is stuck
in C code (a collective, a CUDA call, a lock) and no Python-level request could. The signal is sent by
a small Ray task pinned to the actor's node (`collect_stacks`), so this works across machines.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from innerloop.distributed.config import WatchdogConfig
from innerloop.distributed.cluster.placement import remote_function
from innerloop.distributed.errors import RunStopped
from innerloop.distributed.stacks import LOCAL_NODE, StackLocation, read_stacks

log = logging.getLogger(__name__)

# The bound on a wait when the watchdog is disabled: long enough for any real phase, short enough
# that a hung job still ends (and says where it hung) within a day instead of holding its machines.
DISABLED_BOUND_S = 24 * 3600.0
# Phases with a fixed override `watchdog.<phase>_s` in the config; listed, not derived from field
# names, so that a phase called "floor" or "first" can never pick up `floor_s` or `first_s`.
FIXED_PHASES = ("generate", "update", "sync", "checkpoint", "eval")
COLLECT_TIMEOUT_S = 20.0  # for all actors together; a task needs a worker process on each node

# Actor name -> where its stacks are, as `install_stack_dump` returned it.
Locations = dict[str, StackLocation]


class PhaseStalled(RunStopped):
    """A phase overran its deadline; the message says why the deadline was what it was, where the
    stacks of every process are, and what to change if the phase is legitimately that slow."""

    def __init__(self, phase: str, what: str, deadline_s: float, reason: str, dump_path: Path | None,
                 fix: str):
        self.phase, self.what, self.deadline_s = phase, what, deadline_s
        self.reason, self.dump_path, self.fix = reason, dump_path, fix
        where = (f"the stacks of the driver and every actor are in {dump_path}" if dump_path
                 else "the stack dump could not be written (see the log)")
        super().__init__(f"phase '{phase}' stalled: {what} did not finish within {deadline_s:.1f} s "
                         f"(deadline: {reason}); {where}. {fix}")

    def __reduce__(self):
        # Keyword-style constructors do not survive pickling by default (e.g. into a Ray task's error).
        return type(self), (self.phase, self.what, self.deadline_s, self.reason, self.dump_path, self.fix)


class Watchdog:
    """Per-phase deadlines from the config and each phase's recent durations; see the module doc."""

    def __init__(self, cfg: WatchdogConfig, dump_dir: Path | None,
                 locations: Callable[[], Locations] | None = None):
        self._cfg = cfg
        self.dump_dir = dump_dir  # None: the system's temporary folder
        self._locations = locations  # asked at dump time, so actors restarted since are included
        self._recent: dict[str, deque[float]] = {}

    def deadline(self, phase: str) -> float:
        """Seconds a wait in `phase` may take now; always finite."""
        return self._deadline(phase)[0]

    def record(self, phase: str, seconds: float) -> None:
        """Remember one finished duration of `phase`; only the last `watchdog.history` count."""
        self._recent.setdefault(phase, deque(maxlen=self._cfg.history)).append(float(seconds))

    def wait(self, refs: Any, phase: str, what: str) -> Any:
        """`ray.get(refs)` within the phase's deadline. On an overrun: dump every stack, raise
        PhaseStalled. Errors of the remote call itself (e.g. RayActorError) pass through unchanged."""
        seconds, reason = self._deadline(phase)
        started = time.monotonic()
        try:
            result = ray.get(refs, timeout=seconds)
        except GetTimeoutError:
            path = self._dump(phase, f"phase '{phase}' overran {seconds:.1f} s waiting on {what}")
            raise PhaseStalled(phase, what, seconds, reason, path, self._fix(phase)) from None
        self.record(phase, time.monotonic() - started)
        return result

    def settle(self, refs: list, phase: str, what: str) -> None:
        """Wait within the phase's deadline until every call in `refs` has finished, well or not;
        the caller then reads each result, and handles each failure (a dead worker), on its own."""
        seconds, reason = self._deadline(phase)
        started = time.monotonic()
        _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=seconds, fetch_local=False)
        if pending:
            path = self._dump(phase, f"phase '{phase}' overran {seconds:.1f} s waiting on {what}")
            raise PhaseStalled(phase, what, seconds, reason, path, self._fix(phase))
        self.record(phase, time.monotonic() - started)

    def state(self) -> dict[str, list[float]]:
        """Recent durations per phase, JSON-able: saved with a checkpoint so a resumed run keeps them."""
        return {phase: list(durations) for phase, durations in self._recent.items()}

    def load_state(self, state: dict[str, list[float]]) -> None:
        self._recent = {}
        for phase, durations in state.items():
            for seconds in durations:
                self.record(phase, seconds)

    def _deadline(self, phase: str) -> tuple[float, str]:
        """The deadline and, for the error message, why it is that."""
        cfg = self._cfg
        if not cfg.enabled:
            return DISABLED_BOUND_S, "watchdog.enabled is false, so only the 24 h hard bound applies"
        fixed = getattr(cfg, f"{phase}_s") if phase in FIXED_PHASES else None
        if fixed is not None:
            return fixed, f"fixed by watchdog.{phase}_s"
        recent = self._recent.get(phase)
        if not recent:
            return cfg.first_s, f"watchdog.first_s, the first-call allowance: no '{phase}' has finished yet"
        slowest = max(recent)
        if cfg.factor * slowest >= cfg.floor_s:
            return (cfg.factor * slowest, f"watchdog.factor {cfg.factor:g} x the slowest of the last "
                    f"{len(recent)} '{phase}' durations, {slowest:.1f} s")
        return cfg.floor_s, (f"watchdog.floor_s, which is above watchdog.factor {cfg.factor:g} x the "
                             f"slowest recent '{phase}', {slowest:.1f} s")

    def _fix(self, phase: str) -> str:
        if not self._cfg.enabled:
            return "The watchdog is disabled and this wait hit the hard bound: the stacks show where it hangs."
        fixed = f"watchdog.{phase}_s (a fixed deadline in seconds)" if phase in FIXED_PHASES else "watchdog.first_s"
        return (f"If '{phase}' is legitimately this slow, raise {fixed} or watchdog.factor "
                f"(now {self._cfg.factor:g}); otherwise the stacks show where it hangs.")

    def _dump(self, phase: str, title: str) -> Path | None:
        folder = self.dump_dir or Path(tempfile.gettempdir())
        path = folder / f"stacks-{phase}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        try:
            dump_all(path, self._locations() if self._locations else {}, title)
        except OSError as err:  # a full disk must not hide the stall itself
            log.error("could not write the stack dump %s: %s", path, err)
            return None
        return path


# ---------------------------------------------------------------- stacks of every process


def collect_stacks(locations: Locations, timeout_s: float = COLLECT_TIMEOUT_S) -> dict[str, str]:
    """Each named actor's stacks, read by a Ray task pinned to its node; at most `timeout_s` in all.

    An actor that is gone or does not answer gets a one-line explanation instead of its stacks.
    """
    stacks: dict[str, str] = {}
    pending: dict[str, ray.ObjectRef] = {}
    for name, where in locations.items():
        if where.node_id == LOCAL_NODE:
            stacks[name] = read_stacks(where.pid, where.path)
            continue
        try:
            pending[name] = _pinned_reader(where.node_id).remote(where.pid, where.path)
        except ValueError as err:  # not a node id at all: Ray refuses the scheduling strategy
            stacks[name] = f"no stacks: {err}\n"
    if pending:
        refs = list(pending.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for name, ref in pending.items():
            stacks[name] = _answer(ref, ready, locations[name], timeout_s)
    return {name: stacks[name] for name in locations}  # in the caller's order


def _pinned_reader(node_id: str):
    # soft=False: on any other node the pid would name a different process, or none.
    # num_cpus=0: the actors may hold every CPU, and the reader must run anyway.
    strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
    return remote_function(read_stacks, {"num_cpus": 0, "max_retries": 0, "scheduling_strategy": strategy})


def _answer(ref: ray.ObjectRef, ready: list[ray.ObjectRef], where: StackLocation, timeout_s: float) -> str:
    node_id, pid = where.node_id, where.pid
    if ref not in ready:
        return f"no stacks: the reader on node {node_id} (pid {pid}) did not answer within {timeout_s:.0f} s\n"
    try:
        return ray.get(ref, timeout=timeout_s)  # ready: the timeout only keeps every wait bounded
    except RayError as err:  # the node died, or the task could not run there
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"no stacks: the reader on node {node_id} (pid {pid}) failed: {first_line}\n"


def dump_all(path: Path, locations: Locations, title: str = "") -> None:
    """Write one text file: the driver's stacks, then each actor's, each under a header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Append mode: faulthandler writes through the raw fd, and O_APPEND keeps Python's buffered
    # writes after its bytes instead of over them.
    with open(path, "a") as out:
        out.write(f"innerloop stack dump, {time.strftime('%Y-%m-%d %H:%M:%S')}: {title}\n")
        # The driver first, at once: it shows what the driver waited on at the moment of the overrun.
        out.write(_header(f"driver (pid {os.getpid()})"))
        out.flush()
        faulthandler.dump_traceback(file=out, all_threads=True)
        for name, text in collect_stacks(locations).items():
            where = locations[name]
            out.write(_header(f"{name} (node {where.node_id or 'local'}, pid {where.pid})"))
            out.write(text)


def _header(name: str) -> str:
    return f"\n{'=' * 20} {name} {'=' * 20}\n"
