"""The rollout worker: owns one vLLM engine, samples G trajectories per question, scores them.

This is vLLM's one home in innerloop. The worker is algorithm-blind: it returns trajectories with
the sampler's log-probs, a reward and the policy version that produced them; the driver computes
advantages. It is a plain class; `innerloop.distributed.cluster.placement` wraps it in a Ray actor.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

from innerloop.actors.prompts import question_prompt_ids
from innerloop.distributed.config import Config, RewardConfig, RolloutConfig, SamplingConfig
from innerloop.distributed.records import Question, Rollout, Trajectory
from innerloop.distributed.stacks import StackLocation, install_stack_dump, remove_stack_dump

log = logging.getLogger(__name__)

# Shared memory when the OS has it: the weight file never touches a disk.
_SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _max_model_len(model_path: str, wanted: int) -> int:
    """The configured length, capped at what the model's positions allow (vLLM refuses more)."""
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    return min(wanted, limit) if limit else wanted


def _use_threads(count: int) -> None:
    """Size this process's thread pools, before vLLM starts (its CPU backend refuses changes after)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(count)
    torch.set_num_threads(count)


class RolloutWorker:
    def __init__(self, model_path: str, dtype: str, rollout: RolloutConfig, reward: RewardConfig,
                 system_prompt: str, prompt_template: str, seed: int):
        # vLLM warns on every in-place reload about layers without weights (rotary, tied head).
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        # vLLM's CPU backend drops to one thread unless OMP_NUM_THREADS says otherwise.
        os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        if rollout.threads:
            _use_threads(rollout.threads)
        if rollout.tensor_parallel > 1 and rollout.gpus_per_worker == 0:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_shard_binding(rollout.tensor_parallel, rollout.threads)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if rollout.engine_in_process else "1"
        from vllm import LLM

        from innerloop.actors.rewards import reward_fn_for
        from innerloop.actors.scoring import GuardedScorer

        self._rollout = rollout
        self._system_prompt = system_prompt
        self._prompt_template = prompt_template
        self._llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=seed,  # engine-level seed; a per-request seed crashes vLLM's CPU sampler
            gpu_memory_utilization=rollout.memory_fraction,
            kv_cache_memory_bytes=int(rollout.kv_cache_gib * 2**30) if rollout.kv_cache_gib else None,
            max_model_len=_max_model_len(model_path, rollout.max_model_len),
            max_num_seqs=rollout.max_num_seqs,
            enforce_eager=rollout.enforce_eager,
            enable_prefix_caching=True,  # the G samples of a question share its prompt
            tensor_parallel_size=rollout.tensor_parallel,
            # Shards as processes of this worker, on the GPUs Ray gave it (one bundle: one node).
            distributed_executor_backend="mp" if rollout.tensor_parallel > 1 else None,
            enable_sleep_mode=rollout.colocate,
            # Sampled tokens' log-probs under the distribution actually sampled (logits / temperature),
            # as the learner computes them; vLLM's default is the raw logits' (temperature 1).
            logprobs_mode="processed_logprobs",
            worker_extension_cls="innerloop.actors.weight_loading.WeightLoadingExtension",
            weight_transfer_config=_transfer_config(rollout),
        )
        self._tokenizer = self._llm.get_tokenizer()
        self._scorer = GuardedScorer(
            reward_fn_for(reward),
            timeout_s=reward.timeout_s, failure_reward=reward.failure_reward)
        self.policy_version = 0
        self._asleep: set[str] = set()  # colocated: the memory vLLM's sleep freed and no wake-up restored
        self._location = install_stack_dump()

    def location(self) -> StackLocation:
        """(Ray node id, pid): where the driver sends a stack-dump signal if a phase stalls."""
        return self._location

    def pid(self) -> int:
        return os.getpid()

    def shards(self) -> int:
        """Processes of this engine (tensor-parallel shards): each joins the weight-transfer group."""
        return self._rollout.tensor_parallel

    def sleep(self) -> None:
        """Colocated: free the GPU for the update. Level 1 keeps the weights in host memory, so an
        engine whose sync failed or was skipped still wakes with whole (old) weights."""
        self._llm.sleep(level=1)
        self._asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: list[str]) -> None:
        """Colocated: "weights" before the sync (it writes into them), "kv_cache" before generating;
        only what slept is woken (vLLM maps memory anew on each wake-up)."""
        tags = [tag for tag in tags if tag in self._asleep]
        if tags:
            self._llm.wake_up(tags=tags)
            self._asleep -= set(tags)

    def prompt_ids(self, question: Question) -> list[int]:
        """The chat-templated prompt, tokenized once so trajectories carry exact prompt ids."""
        return question_prompt_ids(self._tokenizer, question, self._system_prompt, self._prompt_template)

    def generate(self, questions: list[Question], samples_per_question: int,
                 sampling: SamplingConfig | None = None, seed: int | None = None) -> Rollout:
        """G trajectories per question, each scored right after generation.

        `seed`: reseed the engine's sampler first, so the same seed, questions and weights give the
        same trajectories (how a resumed run repeats the uninterrupted one).
        """
        from vllm import SamplingParams, TokensPrompt

        if seed is not None:
            self._llm.collective_rpc("innerloop_seed", args=(seed,))
        sampling = sampling or self._rollout
        params = SamplingParams(
            n=samples_per_question, temperature=sampling.temperature, top_p=sampling.top_p,
            max_tokens=sampling.max_tokens, stop=list(sampling.stop) or None,
            logprobs=0,  # 0: the sampled token's own log-prob, no alternatives
        )
        prompts = [self.prompt_ids(q) for q in questions]
        started = time.perf_counter()
        outputs = self._llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                     use_tqdm=False)
        generated = time.perf_counter()
        completions = [(q, p, c) for q, p, out in zip(questions, prompts, outputs) for c in out.outputs]
        results = self._scorer.score([(c.text, q, tuple(c.token_ids)) for q, _, c in completions])
        trajectories = tuple(self._trajectory(q, p, c, r) for (q, p, c), r in zip(completions, results))
        return Rollout(trajectories, generated - started, time.perf_counter() - generated)

    def _trajectory(self, question, prompt_ids, completion, result) -> Trajectory:
        token_ids = tuple(completion.token_ids)
        logprobs = tuple(float(step[tok].logprob) for step, tok in zip(completion.logprobs, token_ids))
        return Trajectory(
            question_id=question.question_id, prompt_ids=tuple(prompt_ids), completion_ids=token_ids,
            logprobs=logprobs, finish_reason=str(completion.finish_reason), text=completion.text,
            reward=result.reward, correct=result.correct, formatted=result.formatted,
            policy_version=self.policy_version, reward_error=result.error, reward_components=result.components)

    def sequence_logprobs(self, token_ids: list[int]) -> list[float]:
        """The engine's log-prob of each token of a fixed sequence given its prefix (first is 0)."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        out = self._llm.generate([TokensPrompt(prompt_token_ids=token_ids)], params, use_tqdm=False)[0]
        return [0.0] + [float(step[tok].logprob) for step, tok in zip(out.prompt_logprobs[1:], token_ids[1:])]

    def join_weight_stream(self, init_info: dict) -> None:
        """Join the pool's transfer group (distributed/transfer.py `GroupAddress.init_info`): every
        process of this engine takes its rank; returns once the whole group has met."""
        self._llm.init_weight_transfer_engine({"init_info": init_info})

    def receive_ipc_weights(self, buckets: list[dict], version: int) -> float:
        """Colocated: weights by CUDA IPC from the learner rank on this GPU; each bucket carries vLLM's
        IPC update info (names, dtypes, shapes, handles), its tensors held alive by the learner until
        this returns. Returns seconds taken."""
        started = time.perf_counter()
        self._llm.start_weight_update()
        for update_info in buckets:
            self._llm.update_weights({"update_info": update_info})
        self._llm.finish_weight_update()
        self._installed(version)
        return time.perf_counter() - started

    def receive_weights(self, update_info: dict, version: int) -> float:
        """Receive streamed weights in place (`WireMeta.update_info`), tagged `version`, while the
        learner broadcasts them; returns seconds taken."""
        started = time.perf_counter()
        self._llm.start_weight_update()
        self._llm.update_weights({"update_info": update_info})
        self._llm.finish_weight_update()
        self._installed(version)
        return time.perf_counter() - started

    def load_weights(self, weights: bytes, version: int) -> float:
        """Install new weights (a safetensors blob) tagged `version`; returns seconds taken."""
        started = time.perf_counter()
        fd, path = tempfile.mkstemp(prefix=f"innerloop-v{version}-", suffix=".safetensors", dir=_SHM_DIR)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(weights)
            self._llm.collective_rpc("innerloop_load_weights", args=(path,))
        finally:
            Path(path).unlink(missing_ok=True)
        self._installed(version)
        return time.perf_counter() - started

    def _installed(self, version: int) -> None:
        # Cached prefixes hold keys and values computed by the old weights.
        self._llm.reset_prefix_cache()
        self.policy_version = version

    def close(self) -> None:
        """Stop the scoring process and the engine's processes; killing the actor alone can leave
        vLLM's engine-core and worker processes running."""
        self._scorer.close()
        remove_stack_dump()
        # vLLM 0.32 has no public shutdown on `LLM`; its engine-core client does.
        self._llm.llm_engine.engine_core.shutdown()


def _transfer_config(rollout: RolloutConfig) -> dict | None:
    """The engine's weight-transfer backend (ours: actors/weight_transfer.py), None for object_store."""
    if rollout.sync != "transfer":
        return None
    if rollout.colocate:
        return {"backend": "ipc"}  # vLLM's own: the learner on the same GPU sends handles, not bytes
    from innerloop.actors.weight_transfer import BACKENDS

    return {"backend": BACKENDS[rollout.transfer_backend]}


def cpu_shard_binding(shards: int, threads: int = 0) -> str:
    """vLLM's CPU thread binding for a tensor-parallel engine: each shard on cores of its own
    ("0|1" for two shards on two cores), `threads` cores each (0: an equal share of them all)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    each = threads or max(1, len(cores) // shards)
    if each * shards > len(cores):
        raise ValueError(f"rollout.tensor_parallel={shards} x {each} threads needs {each * shards} cores; "
                         f"this machine has {len(cores)}")
    groups = [cores[i * each:(i + 1) * each] for i in range(shards)]
    return "|".join(",".join(map(str, group)) for group in groups)


def worker_args(cfg: Config, model_path: str, seed: int) -> tuple:
    """`RolloutWorker`'s arguments for a run's config: `RolloutWorker(*worker_args(...))` in-process,
    `remote_class(RolloutWorker, options).remote(*worker_args(...))` as a Ray actor."""
    tasks = cfg.tasks
    return model_path, cfg.model.dtype, cfg.rollout, cfg.reward, tasks.system_prompt, tasks.prompt_template, seed


def generate_in_process(cfg: Config, model_path: str, questions: list[Question], samples_per_question: int,
                        sampling: SamplingConfig) -> tuple[Trajectory, ...]:
    """One worker in this process (no Ray needed for one engine): generate, then close the engine, so
    its memory is free again when this returns."""
    worker = RolloutWorker(*worker_args(cfg, model_path, cfg.train.seed))
    try:
        return worker.generate(questions, samples_per_question, sampling=sampling).trajectories
    finally:
        worker.close()
