"""Start-up checks: everything about a run that can be checked before any actor starts and before
anything is written to its run directory. Problems are ConfigError, in the user's terms."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from innerloop.distributed.config import Config, ConfigError
from innerloop.distributed.records import Question
from innerloop.distributed.run.questions import fitting_prompts, load_questions
from innerloop.distributed.state.model_prep import resolve_model
from innerloop.distributed.state.trackers import check_trackers

# Reward kinds that score by comparing the completion's answer with the reference via the verifier.
VERIFIER_REWARDS = ("correctness", "four_way", "correct_plus_format")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckedInputs:
    model_path: str
    train: list[Question]
    held_out: list[Question]


def check_run(cfg: Config) -> CheckedInputs:
    """The trackers, the reward, the questions, the model folder, every prompt's length and the memory asked for."""
    check_trackers(cfg.tracking)  # a tracker extra that is not installed: refused with its pip command
    train, held_out = check_inputs(cfg)
    model_path = resolve_model(cfg.model.name)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)  # once, for both sets
    train, held_out = _fitting(cfg, model_path, tokenizer, train), _fitting(cfg, model_path, tokenizer, held_out)
    _check_pool(cfg, train)
    _check_memory(cfg)
    check_devices(cfg)
    check_shards_divide(cfg, model_path)
    check_lora(cfg, model_path)
    return CheckedInputs(model_path, train, held_out)


def check_inputs(cfg: Config) -> tuple[list[Question], list[Question]]:
    """The reward function builds and the questions load: (training, held-out) questions."""
    from innerloop.actors.rewards import RewardConfigError, reward_fn_for

    try:
        reward_fn_for(cfg.reward)
    except RewardConfigError as exc:
        raise ConfigError(f"reward: {exc}") from None
    try:
        train, held_out = load_questions(cfg.tasks, verify_answers=cfg.reward.kind in VERIFIER_REWARDS)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"tasks: {exc}") from None
    if cfg.sft.steps and any(q.messages for q in train):
        raise ConfigError(f"sft.steps={cfg.sft.steps} with a conversational dataset (tasks.question_field="
                          f"{cfg.tasks.question_field} holds chat messages): the SFT stage builds its prompts from "
                          "question text, so it is not built for chat messages yet; set sft.steps=0")
    return train, held_out


def _fitting(cfg: Config, model_path: str, tokenizer, questions: list[Question]) -> list[Question]:
    try:
        kept = fitting_prompts(questions, cfg, model_path, tokenizer)
    except ValueError as exc:
        raise ConfigError(f"tasks: {exc}") from None
    if questions and not kept:
        raise ConfigError(f"tasks: no question fits in rollout.max_model_len={cfg.rollout.max_model_len} tokens "
                          "with its prompt; raise rollout.max_model_len or shorten tasks.system_prompt")
    return kept


def _check_pool(cfg: Config, train: list[Question]) -> None:
    wanted = max(cfg.rollout.questions_per_step, cfg.sft.questions_per_step if cfg.sft.steps else 0)
    if wanted > len(train):
        raise ConfigError(f"a step takes {wanted} distinct questions (rollout.questions_per_step, "
                          f"sft.questions_per_step) but the training pool holds {len(train)}; lower it, "
                          "or add questions (tasks.train_count, or a larger dataset)")


def _check_memory(cfg: Config) -> None:
    """On a machine without GPUs every engine's KV cache comes out of its host memory."""
    kv = cfg.rollout.kv_cache_gib
    if kv is None or cfg.rollout.gpus_per_worker > 0 or not hasattr(os, "sysconf"):
        return
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    if kv >= total:
        raise ConfigError(f"rollout.kv_cache_gib={kv:g} asks for more KV cache than this machine has memory "
                          f"({total:.1f} GiB); lower it (2 GiB serves the demo)")


def check_devices(cfg: Config) -> None:
    """What the device cannot do: colocation without GPUs, more CPU shards than cores."""
    rollout, learner = cfg.rollout, cfg.learner
    if rollout.colocate:
        if learner.gpus_per_rank == 0:
            raise ConfigError("rollout.colocate needs GPUs (learner.gpus_per_rank is 0: a CPU run): it frees a "
                              "sleeping engine's GPU memory for the update and moves weights by CUDA IPC, neither "
                              "of which a CPU has; on CPU the learners and engines already share the machine's "
                              "memory, so set rollout.colocate=false")
        if rollout.workers != learner.ranks:
            raise ConfigError(f"rollout.colocate puts rollout engine i on learner rank i's GPU, so "
                              f"rollout.workers ({rollout.workers}) must equal learner.ranks ({learner.ranks})")
        if learner.zero_stage == 3:
            raise ConfigError("rollout.colocate with learner.zero_stage=3 is not built yet: the colocated sync "
                              "shares each rank's whole parameters with its engine; use learner.zero_stage=2")
        if rollout.sync_backend != "auto" or rollout.sync != "transfer":
            raise ConfigError("rollout.colocate syncs the weights GPU to GPU by CUDA IPC (two processes on one "
                              "GPU cannot form an NCCL group); leave rollout.sync=transfer and "
                              "rollout.sync_backend=auto")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if rollout.tensor_parallel > 1 and rollout.gpus_per_worker == 0 and rollout.tensor_parallel > cores:
        raise ConfigError(f"rollout.tensor_parallel={rollout.tensor_parallel} on CPU puts each shard on cores of "
                          f"its own, but this machine has {cores}; lower rollout.tensor_parallel to {cores} or less")


def check_shards_divide(cfg: Config, model_path: str) -> None:
    """A tensor-parallel engine splits the attention heads evenly over its shards (vLLM's rule)."""
    shards = cfg.rollout.tensor_parallel
    if shards == 1:
        return
    from transformers import AutoConfig

    heads = getattr(AutoConfig.from_pretrained(model_path), "num_attention_heads", None)
    if heads and heads % shards:
        fits = [k for k in range(1, heads + 1) if heads % k == 0 and k < shards] or [1]
        raise ConfigError(f"rollout.tensor_parallel={shards} cannot split {cfg.model.name}'s {heads} attention "
                          f"heads evenly; choose a divisor of {heads} (the widest below {shards}: {fits[-1]})")


def check_lora(cfg: Config, model_path: str) -> None:
    """learner.lora: its target modules are Linear layers of this model (before any actor starts)."""
    lora = cfg.learner.lora
    if lora is None:
        return
    from innerloop.learners.lora import LoraTargetError, check_targets

    try:
        targets = check_targets(model_path, lora)
    except LoraTargetError as exc:
        raise ConfigError(f"{exc} (model {cfg.model.name})") from None
    log.info("LoRA adapters are merged and synced as full weights: each sync sends the whole model, W + B @ A "
             "* alpha / r under the base names (rank %d, alpha %g, on %s)", lora.rank, lora.alpha, ", ".join(targets))
