"""How the chaos soak (scripts/chaos.py) injects each fault into a running job, from outside it, as a
cluster would: signals to the real processes, nodes of Ray's simulated cluster, the real CLI.

Every wait here has a timeout; a fault that could not be injected in time says so (None), and the
soak reports it as a failed check.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

# Ray retitles an actor's process with the method it runs: "ray::RolloutWorker.generate".
WORKER, LEARNER = "ray::RolloutWorker", "ray::Learner"
SYNC_METHODS = ("receive_weights", "join_weight_stream", "load_weights")


def _title(pid: int) -> str:
    """The process's title, read straight from /proc (cheap enough to poll every millisecond)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return ""


def actor_pids(root: psutil.Process, role: str) -> list[int]:
    """The processes under `root` (this script: the cluster's and the driver's) of one actor class."""
    found = []
    for process in root.children(recursive=True):
        title = _title(process.pid)
        if title == role or title.startswith(role + "."):
            found.append(process.pid)
    return found


def kill_mid(root: psutil.Process, role: str, methods: tuple[str, ...], timeout_s: float) -> dict | None:
    """SIGKILL the first `role` process seen running one of `methods`; None if none did in time."""
    wanted = {f"{role}.{m}" for m in methods}
    deadline, refreshed, pids = time.monotonic() + timeout_s, 0.0, []
    while time.monotonic() < deadline:
        if time.monotonic() - refreshed > 0.5:  # workers come and go: look for new ones now and then
            pids, refreshed = actor_pids(root, role), time.monotonic()
        for pid in pids:
            title = _title(pid)
            if title in wanted:
                os.kill(pid, signal.SIGKILL)
                return {"time": time.time(), "pid": pid, "title": title}
        time.sleep(0.001)
    return None


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait (bounded) until these processes ended; those still alive after it."""
    processes = []
    for pid in pids:
        try:
            processes.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    return [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def request(control: Path, what: str, timeout_s: float) -> dict | None:
    """Ask the chaos reward (tests/chaos_reward.py) to hang or overflow once; when a scorer took it."""
    asked = control / what
    asked.write_text("")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        taken = sorted(control.glob(f"{what}.taken-*"))
        if taken:
            name = taken[0].name
            taken[0].unlink()
            return {"time": float(name.rsplit("-", 1)[1]), "scorer_pid": int(name.split("-")[1])}
        time.sleep(0.05)
    asked.unlink(missing_ok=True)  # not taken: withdraw it, so it cannot fire during a later fault
    return None


def scale(run_dir: Path, what: str, count: int, env: dict) -> dict | None:
    """`innerloop scale RUN_DIR --rollout-workers N` (what: "rollout-workers") or `--learner-ranks N`,
    the real command."""
    done = subprocess.run([sys.executable, "-m", "innerloop.distributed.cli", "scale", str(run_dir),
                           f"--{what}", str(count)], env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        print(f"chaos: innerloop scale --{what} {count} failed: {done.stderr.strip()[-500:]}", flush=True)
        return None
    return {"time": time.time(), what: count}


class Nodes:
    """Simulated nodes of Ray's test cluster (one CPU each: room for one rollout worker), added and
    removed from the main thread (Ray starts a node's processes with signal handlers)."""

    def __init__(self, cluster):
        self._cluster = cluster
        self._added: list = []

    def join(self) -> dict:
        node = self._cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
        self._added.append(node)
        return {"time": time.time(), "node": node.node_id}

    def leave(self, worker_up: Callable[[str], bool], timeout_s: float) -> dict | None:
        """Remove the newest added node, once the run has a worker on it (`worker_up(node_id)`, waited for
        up to `timeout_s`): what is measured is losing a working node's worker. A node removed while its
        worker starts is the pool's other path (tests/test_scale.py)."""
        if not self._added:
            return None
        node = self._added.pop()
        deadline = time.monotonic() + timeout_s
        while not (up := worker_up(node.node_id)) and time.monotonic() < deadline:
            time.sleep(0.2)
        self._cluster.remove_node(node, allow_graceful=False)  # the node is gone, as a machine going down
        return {"time": time.time(), "node": node.node_id, "worker_was_up": up}


def orphans(marker: str, value: str) -> list[dict]:
    """Every process on the machine (but this one) that inherited our marker environment variable:
    whatever of our run's processes is still alive, wherever it was re-parented."""
    found, me = [], os.getpid()
    for process in psutil.process_iter(["pid", "name"]):
        if process.pid == me:
            continue
        try:
            if process.environ().get(marker) == value and process.status() != psutil.STATUS_ZOMBIE:
                found.append({"pid": process.pid, "title": _title(process.pid) or process.name()})
        except (psutil.Error, OSError):
            continue
    return found
