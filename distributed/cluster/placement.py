"""Ray's one home for `ray.remote`: starts or joins a cluster and places the actors.

Roles are plain classes (RolloutWorker, Learner); this module is the only place they become Ray
actors. Where the cluster has GPUs, each learner rank and rollout worker gets its GPU through a
placement group, so a job never starts half-placed; on CPU machines actors take a CPU share.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from innerloop.distributed.config import Config
from innerloop.distributed.errors import RunStopped

log = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 300.0


def start_ray(address: str | None) -> None:
    """Join the cluster at `address` ("auto" for the one `ray start` made), or start a local one:
    always our own without `address`, even where a `ray start` cluster runs on the machine."""
    if ray.is_initialized():
        return
    # Every actor sees all the machine's cores: Ray's default of OMP_NUM_THREADS=1 per actor would
    # leave one core idle in each phase, since generation and update take turns on the same cores.
    env = {"env_vars": {"OMP_NUM_THREADS": str(os.cpu_count() or 1), "TOKENIZERS_PARALLELISM": "false"}}
    if address:  # a cluster's resources are its own: joining passes none
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        # Logical CPUs only: rollout engines and learners take turns on the cores, so let them share.
        ray.init(address="local", num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, runtime_env=env,
                 log_to_driver=True)
    _private_token()


def _private_token() -> None:
    """Ray writes its cluster token readable by every user of the machine; only its owner needs it."""
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if token.is_file() and token.stat().st_mode & 0o077:
        token.chmod(0o600)


def stop_ray() -> None:
    """End this process's Ray: a local cluster it started stops with every process of it."""
    if ray.is_initialized():
        ray.shutdown()


def check_fits(cfg: Config, have: dict[str, float], joined: bool, widest: float | None = None) -> None:
    """Every learner rank and rollout worker takes one logical CPU and its GPU share; an engine takes
    rollout.engine_gpus on one node. `widest`: the most GPUs any node of the cluster has. On a
    cluster this run started itself, one that cannot hold them all is refused at once (they would
    wait forever); a joined cluster may still grow (an autoscaler), so it gets a warning."""
    problems = _shortfalls(cfg, have)
    engine = cfg.rollout.engine_gpus
    if widest is not None and engine > widest + 1e-9:
        problems.append(f"rollout.tensor_parallel={cfg.rollout.tensor_parallel} needs {engine:g} GPUs on one node "
                        f"for each engine, but the widest node has {widest:g}; lower rollout.tensor_parallel "
                        f"to {int(widest)} or less, or add a node with {engine:g} GPUs")
    if not problems:
        return
    message = "; ".join(problems)
    if not joined:
        raise RunStopped(message)
    log.warning("%s; waiting for the cluster to grow", message)


def _shortfalls(cfg: Config, have: dict[str, float]) -> list[str]:
    gpus = (cfg.learner.ranks if cfg.rollout.colocate else
            cfg.learner.ranks * cfg.learner.gpus_per_rank + cfg.rollout.workers * cfg.rollout.engine_gpus)
    need = {"CPU": cfg.learner.ranks + cfg.rollout.workers, "GPU": gpus}
    short = {kind: (n, have.get(kind, 0.0)) for kind, n in need.items() if n > have.get(kind, 0.0) + 1e-9}
    if not short:
        return []
    what = "; ".join(f"{n:g} {kind}s needed, {got:g} in the cluster" for kind, (n, got) in short.items())
    return [f"learner.ranks={cfg.learner.ranks} and rollout.workers={cfg.rollout.workers} do not fit: {what}. Lower "
            "them (or the GPU shares learner.gpus_per_rank, rollout.gpus_per_worker, rollout.tensor_parallel), "
            "or add nodes"]


def ranks_fit(cfg: Config, ranks: int, workers: int, have: dict[str, float]) -> list[str]:
    """Why `ranks` learner ranks beside `workers` rollout workers would not fit the cluster (empty: they fit)."""
    sized = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"ranks": ranks}),
                                   "rollout": cfg.rollout.model_copy(update={"workers": workers})})
    return _shortfalls(sized, have)


def widest_node_gpus() -> float:
    """The most GPUs one alive node of the cluster has."""
    return max((resources.get("GPU", 0.0) for resources in alive_nodes().values()), default=0.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


# Colocated: learner rank i and rollout engine i each hold half of bundle i's GPU in Ray's books
# (both really use all of it, taking turns: the engine sleeps during the update).
COLOCATED_SHARE = 0.5


def _gpu_bundles(cfg: Config) -> list[dict[str, float]]:
    """One bundle per learner rank, then one per engine: a bundle is on one node, so a
    tensor-parallel engine's GPUs are too. Colocated: one bundle per GPU, shared by a rank and an engine."""
    if cfg.rollout.colocate:
        return [{"CPU": 2, "GPU": 1}] * cfg.learner.ranks
    learner = [{"CPU": 1, "GPU": cfg.learner.gpus_per_rank}] * cfg.learner.ranks
    rollout = [{"CPU": 1, "GPU": cfg.rollout.engine_gpus}] * cfg.rollout.workers
    return learner + rollout


class Placement:
    """Scheduling options for each learner rank and rollout worker."""

    def __init__(self, cfg: Config, timeout_s: float = PLACEMENT_TIMEOUT_S):
        self._cfg = cfg
        self._group = None
        if cfg.learner.gpus_per_rank > 0 or cfg.rollout.gpus_per_worker > 0 or cfg.rollout.colocate:
            self._group = placement_group(_gpu_bundles(cfg), strategy="PACK")
            ready, _ = ray.wait([self._group.ready()], timeout=timeout_s)
            if not ready:
                ray.util.remove_placement_group(self._group)
                raise RunStopped(
                    f"could not place {cfg.learner.ranks} learner ranks and {cfg.rollout.workers} rollout "
                    f"workers with their GPUs within {timeout_s:.0f} s; the cluster has "
                    f"{ray.cluster_resources().get('GPU', 0):.0f} GPUs. Lower learner.ranks or rollout.workers.")

    @property
    def group(self):
        """The placement group holding every bundle (None on CPU-only runs)."""
        return self._group

    def rendezvous(self) -> tuple[str, int]:
        """Address and free port for the learners' process group, on the node of learner rank 0:
        its rank hosts the rendezvous store, and on a cluster that need not be the driver's node."""
        if self._group is None:
            return ray.util.get_node_ip_address(), free_port()
        strategy = PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=0)
        probe = remote_function(node_address, {"num_cpus": 0, "scheduling_strategy": strategy})
        return ray.get(probe.remote(), timeout=PLACEMENT_TIMEOUT_S)[:2]

    def _options(self, bundle_index: int, gpus: float) -> dict:
        if self._group is None:
            return {"num_cpus": 1}
        strategy = PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=bundle_index)
        return {"num_cpus": 1, "num_gpus": gpus, "scheduling_strategy": strategy}

    def learner_options(self, rank: int) -> dict:
        if self._cfg.rollout.colocate:
            return self._options(rank, COLOCATED_SHARE)
        gpus = self._cfg.learner.gpus_per_rank
        if rank >= self._cfg.learner.ranks and self._group is not None:  # added in-job: no bundle of its own
            return {"num_cpus": 1, **({"num_gpus": gpus} if gpus else {})}
        return self._options(rank, gpus)

    def rollout_options(self, index: int, node_id: str | None = None) -> dict:
        """`node_id`: start it on that node (a node that joined the cluster mid-run)."""
        rollout = self._cfg.rollout
        if index >= rollout.workers:  # added while running: outside the placement group, GPUs of its own
            gpus = rollout.engine_gpus
            options = {"num_cpus": 1, **({"num_gpus": gpus} if gpus else {})}
            if node_id is not None:
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
            return options
        if rollout.colocate:
            return self._options(index, COLOCATED_SHARE)
        return self._options(self._cfg.learner.ranks + index, rollout.engine_gpus)

    def workers_that_fit(self, node_resources: dict[str, float]) -> int:
        """Rollout workers a node can host: one per engine's GPUs on a GPU node, one on a CPU-only node."""
        gpus = self._cfg.rollout.engine_gpus
        if gpus > 0:
            return int(node_resources.get("GPU", 0.0) // gpus)
        return 1 if node_resources.get("CPU", 0.0) >= 1 else 0


def alive_nodes() -> dict[str, dict[str, float]]:
    """Node id -> total resources, of every node of the cluster that is alive now."""
    return {node["NodeID"]: node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")}


def remote_class(cls, options: dict):
    """The one place a role class becomes a Ray actor class."""
    return ray.remote(cls).options(**options)


def node_address() -> tuple[str, int, str]:
    """(IP, a free port, Ray node id) of the node this runs on."""
    return ray.util.get_node_ip_address(), free_port(), ray.get_runtime_context().get_node_id()


def remote_function(fn, options: dict):
    """The one place a plain function becomes a Ray task (e.g. the watchdog's pinned stack reader)."""
    return ray.remote(fn).options(**options)
