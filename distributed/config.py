"""The typed experiment config: defaults are the CPU demo, every field validated before any actor starts.

Every section, key, default and unit is here or in the section files it assembles (config_rollout.py, config_tasks.py, config_extras.py); reading a file and `--set` overrides into it is
config_load.py's job. An unknown key or a value of the wrong type fails with the key and the fix named.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field, model_validator

from innerloop.distributed.config_base import ConfigError, Section
from innerloop.distributed.config_extras import LoraConfig, TrackingConfig
from innerloop.distributed.config_rollout import RolloutConfig, SamplingConfig
from innerloop.distributed.config_tasks import RewardConfig, RewardFunction, TaskConfig

__all__ = ["ConfigError", "LoraConfig", "TrackingConfig", "RewardConfig", "RewardFunction", "RolloutConfig", "SamplingConfig", "TaskConfig"]  # re-exported: every room imports them from here


# The inner-loop probe's suffix (PAPER.md): the paper's lead-in, then the reference answer.
ANSWER_SLOT = "{answer}"
DEFAULT_SUFFIX = "\n\n**Final Answer**\n\\boxed{{answer}}"  # text after {answer} is not fed


def check_suffix_template(suffix_template: str) -> None:
    if suffix_template.count(ANSWER_SLOT) != 1 or not suffix_template.split(ANSWER_SLOT)[0]:
        raise ValueError(f"the suffix {suffix_template!r} must hold {ANSWER_SLOT} exactly once, after some "
                         "lead-in text: the first answer token is predicted from it (the paper's suffix is "
                         f"{DEFAULT_SUFFIX!r})")


class ModelConfig(Section):
    # "smollm2-135m-instruct" is converted once from the registry package and cached;
    # any Hugging Face model folder works, and a hub id where the machine reaches a hub.
    name: str = "smollm2-135m-instruct"
    dtype: Literal["bfloat16", "float32"] = "bfloat16"


class AlgorithmConfig(Section):
    advantage_scale: Literal["std", "none"] = "std"  # std: GRPO; none: Dr.GRPO
    clip_low: float = Field(0.2, ge=0.0, lt=1.0)
    clip_high: float = Field(0.28, ge=0.0)  # clip-higher: a wider upper bound keeps exploring
    kl_coef: float = Field(0.0, ge=0.0)  # > 0 loads a frozen reference model
    # Named by the gradient each gives (learners/grpo.py, departure 5): k2 pulls by KL(policy || ref),
    # k3 by the forward KL(ref || policy), k1's expected gradient is zero (it only adds noise).
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    # The KL reference. start: the model GRPO starts from (after an SFT stage, the SFT model; kept in
    # checkpoints); base: model.name as loaded, whatever an SFT stage did.
    kl_reference: Literal["start", "base"] = "start"
    aggregation: Literal["token", "sequence"] = "token"
    entropy_coef: float = 0.0
    # Several optimizer steps per batch of rollouts: the batch is cut into `mini_batches` parts, one
    # step each, `epochs` times over. Old log-probs are the learner's at the start of the batch, so
    # from the second step on the ratio moves and clip_low/clip_high act. 1 x 1: one step per batch.
    mini_batches: int = Field(1, ge=1)
    epochs: int = Field(1, ge=1)
    # Importance weights sampler -> learner (learners/off_policy.py). stale_only: only trajectories
    # an older policy sampled (rollout.asynchronous), per token, min(pi / mu, tis_cap). The other
    # modes weigh every token, correcting the train-inference mismatch too: token_truncate |
    # token_mask | sequence_truncate | sequence_mask (truncate: capped at tis_cap; mask: 0 above it).
    sampler_correction: Literal["stale_only", "token_truncate", "token_mask", "sequence_truncate",
                                "sequence_mask"] = "stale_only"
    tis_cap: float = Field(2.0, gt=0.0)
    # Update subset m: advantages use all G trajectories of a question, but only a seeded random m of
    # them get the policy-gradient term. null: all G (plain GRPO). Checked against rollout.group_size.
    update_subset: int | None = Field(None, ge=1)
    # true: KL and entropy also cover only the update subset; false: they cover all G trajectories.
    mask_kl_and_entropy_by_update: bool = False

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps one batch of rollouts takes."""
        return self.mini_batches * self.epochs


class LearnerConfig(Section):
    ranks: int = Field(1, ge=1)  # data-parallel DeepSpeed ranks, each a Ray actor
    zero_stage: Literal[0, 1, 2, 3] = 2
    lr: float = Field(2e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.99)  # Adam's; each in [0, 1)
    warmup_steps: int = Field(2, ge=0)
    grad_clip: float = Field(1.0, gt=0.0)
    micro_batch_size: int = Field(16, ge=1)  # samples per forward/backward on one rank
    # A token budget instead: each micro-batch holds as many length-sorted samples as fit in this many
    # padded tokens (rows x longest row); micro_batch_size is then unused. null: micro_batch_size.
    max_tokens_per_micro_batch: int | None = Field(None, ge=1)
    # Padding-free micro-batches: a micro-batch's samples end to end in one row, attention kept within
    # each sample (transformers' block mask from position ids); the token budget then counts real
    # tokens. docs/performance.md has what it buys on the CPU's attention.
    packing: bool = False
    gradient_checkpointing: bool = False  # trades compute for memory; a 135M model fits without it
    # torch's fused AdamW: one kernel over ZeRO's flat partition, without the full-size temporaries
    # the per-tensor loop makes (docs/performance.md has what it saves); false: that loop.
    fused_optimizer: bool = False
    # DeepSpeed's gradient-reduce and parameter all-gather buckets, in elements. null: sized from the
    # model (its largest parameter; docs/performance.md has the memory it saves); DeepSpeed's own is 5e8.
    bucket_elements: int | None = Field(None, ge=1)
    threads: int = Field(0, ge=0)  # torch threads per rank; 0 = the machine's cores / ranks
    gpus_per_rank: float = Field(0.0, ge=0.0)
    lora: LoraConfig | None = None  # a LoRA adapter instead of full weights (null: full fine-tuning)
    # A planned number of ranks by step, e.g. {10: 2, 30: 1}: before step 10 the run checkpoints,
    # restarts its learners as 2 ranks and loads the checkpoint resharded (docs/resilience.md), before
    # step 30 goes back to 1. Applied like `innerloop scale RUN_DIR --learner-ranks N`.
    rank_schedule: dict[int, int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _betas_in_range(self) -> "LearnerConfig":
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"learner.betas {list(self.betas)}: Adam's betas must each be in [0, 1), e.g. [0.9, 0.999]")
        if self.bucket_elements is not None and self.bucket_elements % 2:
            raise ValueError(f"learner.bucket_elements = {self.bucket_elements}: DeepSpeed needs an even count; "
                             f"use {self.bucket_elements + 1}, or null to size it from the model")
        bad = {step: count for step, count in self.rank_schedule.items() if step < 0 or count < 1}
        if bad:
            raise ValueError(f"learner.rank_schedule {bad}: steps must be >= 0 and rank counts >= 1")
        return self


class SampledEvalConfig(Section):
    # Pass@k beside strict and lenient accuracy (docs/evaluation.md): `samples` completions per
    # held-out question at `temperature` > 0 (top_p, max_tokens, stop: eval's), on the first
    # `questions` held-out questions (0: all). samples 0: off. `innerloop eval` always reports it.
    samples: int = Field(8, ge=0)
    temperature: float = Field(0.7, gt=0.0)
    pass_k: list[int] = Field(default_factory=lambda: [2, 4, 8], min_length=1)  # even k (mG-Pass@k's sum)
    # 32 x 8 samples take about 1.5 min on the 2-core CPU demo machine (float32), as long as 8 steps.
    questions: int = Field(32, ge=0)
    # Which of a run's held-out evals also report it: off (the default: see the cost above) | after
    # (the final eval, which the sweep table reads) | before_and_after.
    in_training: Literal["off", "after", "before_and_after"] = "off"

    @model_validator(mode="after")
    def _standard_pass_k(self) -> "SampledEvalConfig":
        if self.samples and self.samples < 8:
            raise ValueError(f"eval.sampled.samples = {self.samples}: Pass@k here is estimated from at least 8 "
                             "samples per question (Pass@8 needs 8); set 8 or more, or 0 to turn it off")
        for k in self.pass_k:
            if k < 2 or k % 2:
                raise ValueError(f"eval.sampled.pass_k holds k={k}: give even k >= 2 (mG-Pass@k's thresholds "
                                 "above k/2 are exact only for even k; Pass@1 is Avg@n, reported anyway)")
            if self.samples and k > self.samples:
                raise ValueError(f"eval.sampled.pass_k holds k={k} > eval.sampled.samples = {self.samples}; "
                                 f"draw at least {k} samples or drop k={k}")
        return self

    def sampling(self, base: SamplingConfig) -> SamplingConfig:
        """The eval's sampling settings at this temperature."""
        return SamplingConfig(temperature=self.temperature, top_p=base.top_p, max_tokens=base.max_tokens,
                              stop=list(base.stop))


class EvalConfig(SamplingConfig):
    temperature: float = Field(0.0, ge=0.0)  # greedy: the same sampling before and after
    before_and_after: bool = True  # held-out accuracy before the first and after the last step
    every: int = Field(0, ge=0)  # also every N steps (0: never)
    # `innerloop eval` only (training's evals draw one sample): n completions per held-out question,
    # and the ks at which Pass@k and mG-Pass@k are reported (see docs/evaluation.md).
    samples: int = Field(1, ge=1)
    pass_k: list[int] = Field(default_factory=lambda: [1], min_length=1)
    sampled: SampledEvalConfig = Field(default_factory=SampledEvalConfig)

    @model_validator(mode="after")
    def _ks_fit_the_samples(self) -> "EvalConfig":
        for k in self.pass_k:
            if k < 1:
                raise ValueError(f"eval.pass_k holds k={k}; every k must be at least 1")
            if k > self.samples:
                raise ValueError(f"eval.pass_k holds k={k}, but Pass@k needs k <= eval.samples "
                                 f"= {self.samples}; set eval.samples to at least {k} or drop k={k}")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(f"eval.samples={self.samples} with eval.temperature=0: greedy decoding gives "
                             f"the same completion {self.samples} times, so Pass@k would equal Pass@1; "
                             "set eval.temperature above 0 (e.g. 0.7) or eval.samples=1")
        return self


class TrainConfig(Section):
    steps: int = Field(40, ge=1)
    seed: int = 0
    checkpoint_every: int = Field(10, ge=0)  # steps; 0: only at the end
    keep_checkpoints: int = Field(2, ge=1)
    export_final_model: bool = True
    # Stop taking steps after this many minutes from the start (0: no limit); the demo keeps to 30.
    max_minutes: float = Field(24.0, ge=0.0)
    # Besides the newest `keep_checkpoints`, keep this many best by `best_metric` (0: none).
    keep_best: int = Field(1, ge=0)
    # Any number the step logs; eval_accuracy counts when eval.every lines up with checkpoint_every.
    best_metric: str = "reward_mean"
    best_mode: Literal["max", "min"] = "max"
    # SIGTERM: finish and checkpoint the step in progress within this many seconds, else stop where it is.
    stop_grace_s: float = Field(25.0, gt=0.0)


class SftConfig(Section):
    # A supervised stage before GRPO (an SFT cold start): for `steps` steps the learner imitates
    # verified-correct trajectories (negative log-likelihood), then the run goes on to GRPO's
    # train.steps by itself. 0: no SFT stage.
    steps: int = Field(0, ge=0)
    # solutions: the task generator's worked step-by-step solutions; file: a JSONL file of
    # {question_id, prompt, answer, completion}; teacher: a model's rollouts (a vLLM rollout worker).
    source: Literal["solutions", "file", "teacher"] = "solutions"
    path: str | None = None  # source: file
    teacher: str | None = None  # source: teacher; a model folder or alias
    teacher_samples: int = Field(8, ge=1)  # trajectories the teacher samples per question
    # k: distinct verifier-correct trajectories per question, padded by repetition to exactly k, so
    # every question is seen equally often.
    distinct: int = Field(1, ge=1)
    # R: pad every question to R rows instead of k (R >= k), as the paper's k sweep does: the data
    # volume per step is then the same for every k, and only the diversity changes. null: k rows.
    rows: int | None = Field(None, ge=1)
    questions_per_step: int = Field(16, ge=1)  # an SFT step's batch is questions_per_step x rows (or x distinct)

    @property
    def rows_per_question(self) -> int:
        return self.distinct if self.rows is None else self.rows

    @model_validator(mode="after")
    def _source_needs_its_input(self) -> "SftConfig":
        if self.source == "file" and not self.path:
            raise ValueError("sft.source is 'file' but sft.path is not set; set sft.path=FILE.jsonl")
        if self.source == "teacher" and not self.teacher:
            raise ValueError("sft.source is 'teacher' but sft.teacher is not set; set sft.teacher=MODEL")
        if self.rows is not None and self.rows < self.distinct:
            raise ValueError(f"sft.rows = {self.rows} is below sft.distinct = {self.distinct}: every question is "
                             f"padded to sft.rows rows, which must hold its k distinct trajectories; set sft.rows "
                             f">= {self.distinct}, or null for k rows")
        return self


class ProbeConfig(Section):
    # The inner-loop probe during training (docs/probe.md): every `every_steps` steps, the reference
    # answer's NLL after each prefix of some of that step's trajectories, under the weights that
    # step trained from, written to run_dir/probe/. `innerloop probe` does the same for any model.
    every_steps: int = Field(0, ge=0)  # 0: never
    questions: int = Field(4, ge=1)  # of the step's questions (the first ones)
    samples: int = Field(2, ge=1)  # trajectories per question
    every: int = Field(4, ge=1)  # a point after every N-th trajectory token (1: every prefix)
    # The control: per probed question, this many trajectories of another probed question read after
    # this question's prompt and scored against its answer (docs/probe.md). 0: none.
    other_question: int = Field(0, ge=0)
    suffix: str = DEFAULT_SUFFIX  # appended after the prefix; {answer} is the reference answer

    @model_validator(mode="after")
    def _suffix_has_the_answer(self) -> "ProbeConfig":
        check_suffix_template(self.suffix)
        return self


class RecoveryConfig(Section):
    # A rollout worker whose process dies is replaced (its questions redone) up to this many times.
    max_worker_restarts: int = Field(3, ge=0)
    # A dead learner rank restarts every rank from the last checkpoint, up to this many times.
    max_learner_restarts: int = Field(2, ge=0)
    # After every step each learner rank hands the driver a copy of its model, optimizer, LR-schedule
    # and RNG state, kept in Ray's object store (host memory, about 16 bytes per trained parameter
    # in float32 with AdamW); a dead rank then costs no step: the restarted ranks load that copy. It
    # falls back to the last checkpoint when the copy is gone (its node died). docs/resilience.md
    # has the memory and the seconds per step it costs.
    learner_snapshot: bool = False
    # A step whose loss or gradients are NaN/inf is skipped (no weight change) and its data saved
    # under run_dir/bad_steps/; after this many such steps the run stops.
    max_nonfinite_steps: int = Field(3, ge=1)


class WatchdogConfig(Section):
    # Each phase (generate, update, sync, checkpoint, eval) must finish within a deadline:
    # `factor` x its slowest recent duration, at least `floor_s`; `first_s` before it has a history
    # (first calls include warm-up). A phase set below overrides that with a fixed number of seconds.
    # An overrun dumps every actor's and the driver's stacks and stops the run; it never hangs.
    enabled: bool = True
    factor: float = Field(5.0, ge=1.0)
    floor_s: float = Field(120.0, gt=0.0)
    first_s: float = Field(1800.0, gt=0.0)
    history: int = Field(20, ge=1)  # recent durations remembered per phase
    generate_s: float | None = Field(None, gt=0.0)
    update_s: float | None = Field(None, gt=0.0)
    sync_s: float | None = Field(None, gt=0.0)
    checkpoint_s: float | None = Field(None, gt=0.0)
    eval_s: float | None = Field(None, gt=0.0)


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    tasks: TaskConfig = Field(default_factory=TaskConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _batch_divides(self) -> "Config":
        samples, steps = self.rollout.questions_per_step * self.rollout.group_size, self.algorithm.mini_batches
        if samples % steps:
            raise ValueError(f"rollout.questions_per_step x rollout.group_size = {samples} samples per step cannot be "
                             f"cut into algorithm.mini_batches = {steps} equal mini-batches; choose a divisor of {samples}")
        self._check_divides(samples // steps, "a mini-batch (rollout.questions_per_step x rollout.group_size / "
                            "algorithm.mini_batches)" if steps > 1 else "rollout.questions_per_step x rollout.group_size",
                            "per step", "learner.micro_batch_size, algorithm.mini_batches or rollout.questions_per_step")
        return self

    def _check_divides(self, samples: int, what: str, per: str, fix: str) -> None:
        """Every rank runs the same number of whole micro-batches of a step's samples (under a token
        budget, the same number of samples)."""
        budget = self.learner.max_tokens_per_micro_batch is not None
        per_pass = self.learner.ranks * (1 if budget else self.learner.micro_batch_size)
        if samples % per_pass:
            unit = "learner.ranks" if budget else "learner.ranks x learner.micro_batch_size"
            raise ValueError(f"{what} = {samples} samples {per} must divide evenly into {unit} = {per_pass}; "
                             f"change {fix}")

    @model_validator(mode="after")
    def _rank_schedule_fits(self) -> "Config":
        """Every rank count learner.rank_schedule names must split the step's batch as learner.ranks must."""
        if self.learner.rank_schedule and self.rollout.colocate:
            raise ValueError("learner.rank_schedule with rollout.colocate: a colocated engine shares its GPU with one "
                             "learner rank, so the ranks cannot change alone; drop the schedule or set "
                             "rollout.colocate=false")
        for step, ranks in sorted(self.learner.rank_schedule.items()):
            try:
                self.model_copy(update={"learner": self.learner.model_copy(update={"ranks": ranks})})._batch_divides()
            except ValueError as exc:
                raise ValueError(f"learner.rank_schedule {{{step}: {ranks}}}: with {ranks} ranks, {exc}") from None
        return self

    @model_validator(mode="after")
    def _update_subset_fits_group(self) -> "Config":
        m, G = self.algorithm.update_subset, self.rollout.group_size
        if m is not None and not 1 <= m <= G:
            raise ValueError(
                f"algorithm.update_subset = {m} must be between 1 and rollout.group_size = {G} "
                f"(it picks m of each question's G trajectories for the policy-gradient term); "
                f"set it in 1..{G}, or null to update all {G}")
        return self

    @model_validator(mode="after")
    def _no_nucleus_under_importance_weights(self) -> "Config":
        """top_p < 1 biases pi / mu wherever the sampler's log-probs weigh the loss (grpo.py, departure 11)."""
        rollout, algo = self.rollout, self.algorithm
        weighing = [what for what, on in (
            ("rollout.asynchronous (stale trajectories are importance-weighted)",
             rollout.asynchronous and rollout.max_staleness > 0),
            (f"algorithm.sampler_correction = {algo.sampler_correction}", algo.sampler_correction != "stale_only"),
        ) if on]
        if rollout.top_p < 1.0 and weighing:
            raise ValueError(f"rollout.top_p = {rollout.top_p:g} with {' and '.join(weighing)}: vLLM's log-probs are "
                             "renormalised over the top-p nucleus, the learner's over the whole vocabulary, so the "
                             "importance weights pi / mu would be biased on every token; set rollout.top_p=1.0, or "
                             "turn the weighting off (rollout.asynchronous=false, algorithm.sampler_correction=stale_only)")
        return self

    @model_validator(mode="after")
    def _sft_batch_divides(self) -> "Config":
        if self.sft.steps:
            what = "sft.questions_per_step x " + ("sft.distinct" if self.sft.rows is None else "sft.rows")
            self._check_divides(self.sft.questions_per_step * self.sft.rows_per_question, what,
                                "per SFT step", "sft.questions_per_step")
        return self

    @model_validator(mode="after")
    def _probe_reads_whole_weights(self) -> "Config":
        if self.probe.every_steps and self.learner.zero_stage == 3:
            raise ValueError("probe.every_steps needs learner rank 0 to hold the whole weights, which ZeRO "
                             "stage 3 partitions; use learner.zero_stage=2, or run `innerloop probe` on a "
                             "checkpoint instead")
        return self

    @property
    def total_steps(self) -> int:
        """The run's steps: the SFT stage's, then GRPO's."""
        return self.sft.steps + self.train.steps

    def fingerprint(self) -> str:
        """A short hash of the resolved config, recorded with checkpoints."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]
