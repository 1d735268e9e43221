"""Light stand-ins for the engine and the learner's work, for scripts/bench_scale.py (never the product).

They take the same constructor arguments and answer the same calls as `RolloutWorker` and `Learner`,
so the product's Fleet, RolloutPool, placement, weight sync and driver loop run unchanged around
them; only the work inside is replaced by a fixed sleep and fixed-size records. Every worker does the
same work per call whatever the pool's size, so what grows with the pool is the driver's own cost.
They import no torch, vLLM or DeepSpeed where they can avoid it: hundreds of them must fit in memory.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from innerloop.distributed.records import NllSums, PolicySums, Rollout, Trajectory, UpdateMetrics
from innerloop.distributed.stacks import install_stack_dump

# Fixed work per call, the same for every worker and pool size (seconds; tokens per trajectory).
GENERATE_S = float(os.environ.get("INNERLOOP_SCALE_GENERATE_S", "0.05"))
UPDATE_S = float(os.environ.get("INNERLOOP_SCALE_UPDATE_S", "0.05"))
LOAD_S = float(os.environ.get("INNERLOOP_SCALE_LOAD_S", "0.005"))
PROMPT_TOKENS, COMPLETION_TOKENS = 32, 32
BLOB_BYTES = 1 << 20  # the object-store sync's "weights"


class ScaleWorker:
    """Stands in for `RolloutWorker`: G fixed-size trajectories per question after a fixed sleep.
    It keeps the wall-clock time each call started at, for the scheduling latency (`call_starts`)."""

    def __init__(self, model_path, dtype, rollout, reward, system_prompt, prompt_template, seed):
        self._rollout, self._seed = rollout, seed
        self.policy_version = 0
        self._starts: list[tuple[str, float]] = []
        self._location = install_stack_dump()

    def location(self):
        return self._location

    def pid(self) -> int:
        return os.getpid()

    def shards(self) -> int:
        return self._rollout.tensor_parallel

    def generate(self, questions, samples_per_question, sampling=None, seed=None) -> Rollout:
        self._starts.append(("generate", time.time()))
        time.sleep(GENERATE_S)
        prompt = tuple(range(PROMPT_TOKENS))
        completion = tuple(range(1, COMPLETION_TOKENS + 1))
        logprobs = (-0.5,) * COMPLETION_TOKENS
        trajectories = tuple(
            Trajectory(q.question_id, prompt, completion, logprobs, "stop", "12", reward=float(i % 2),
                       correct=bool(i % 2), formatted=True, policy_version=self.policy_version)
            for q in questions for i in range(samples_per_question))
        return Rollout(trajectories, GENERATE_S, 0.0)

    def join_weight_stream(self, init_info: dict) -> None:
        self._starts.append(("join", time.time()))

    def receive_weights(self, update_info: dict, version: int) -> float:
        self._starts.append(("receive", time.time()))
        time.sleep(LOAD_S)
        self.policy_version = version
        return LOAD_S

    def load_weights(self, weights: bytes, version: int) -> float:
        self._starts.append(("load", time.time()))
        time.sleep(LOAD_S)
        self.policy_version = version
        return LOAD_S

    def call_starts(self) -> list[tuple[str, float]]:
        """(method, wall-clock start) of every call since the last ask."""
        starts, self._starts = self._starts, []
        return starts

    def close(self) -> None:
        pass


class ScaleLearner:
    """Stands in for `Learner`: a fixed sleep per update, a fixed-size blob for the weights."""

    def __init__(self, model_path, dtype, learner_cfg, algorithm, temperature, rank, world_size, master, port, seed):
        self.rank = rank
        self._applied = 0
        self._location = install_stack_dump()

    def location(self):
        return self._location

    def update(self, samples, normalizers) -> UpdateMetrics:
        time.sleep(UPDATE_S)
        self._applied += 1
        tokens = float(sum(sum(s.loss_mask) for s in samples))
        sums = PolicySums(0.5, 0.5, 0.0, 0.0, 0.0, tokens, tokens, tokens, 0.0)
        return UpdateMetrics(sums, grad_norm=1.0, learning_rate=1e-5, update_seconds=UPDATE_S, skipped=False,
                             reference_seconds=0.0)

    def sft_update(self, samples, normalizer) -> UpdateMetrics:
        time.sleep(UPDATE_S)
        return UpdateMetrics(NllSums(1.0, 1.0, float(normalizer)), grad_norm=1.0, learning_rate=1e-5,
                             update_seconds=UPDATE_S, skipped=False)

    def weights_blob(self) -> bytes | None:
        return b"\0" * BLOB_BYTES if self.rank == 0 else None

    def weights_meta(self):
        from innerloop.distributed.transfer import TensorMeta, WireMeta

        return WireMeta(tuple(TensorMeta(f"layer.{i}.weight", "float32", (256, 256)) for i in range(4)))

    def open_weight_stream(self, address) -> None:
        pass

    def close_weight_stream(self) -> None:
        pass

    def stream_weights(self) -> float:
        time.sleep(LOAD_S)
        return LOAD_S

    def export(self, folder: str) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text("{}")

    def save_checkpoint(self, folder: str, tag: str) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{tag}-{self.rank}.txt").write_text(str(self._applied))

    def load_checkpoint(self, folder: str, tag: str, saved_world_size=None) -> None:
        self._applied = int((Path(folder) / f"{tag}-{self.rank}.txt").read_text())
