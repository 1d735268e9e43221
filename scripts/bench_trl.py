"""TRL's GRPOTrainer on the demo's workload, timed per step: the peer of `scripts/bench.py step`.

Run by `scripts/bench_trl.sh`, in a venv that adds TRL beside innerloop's packages. Same model,
questions (in the same order), reward, G, questions per step, max tokens, sampling temperature,
learning rate, clipping and optimizer as the demo; one optimizer step per batch of rollouts; no KL.
Writes <out>/trl.json with each step's wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    args = _parser().parse_args()
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from innerloop.actors.rewards import reward_fn_for
    from innerloop.distributed.config_load import load_config
    from innerloop.distributed.state.model_prep import resolve_model
    from innerloop.distributed.run.questions import QuestionStream, load_questions
    from innerloop.distributed.records import Question

    cfg = load_config(None, [f"rollout.max_tokens={args.max_tokens}", *args.overrides])
    rollout, learner, algorithm = cfg.rollout, cfg.learner, cfg.algorithm
    train, _ = load_questions(cfg.tasks)
    questions = QuestionStream(train, cfg.train.seed).take(rollout.questions_per_step * args.steps)
    dataset = Dataset.from_list([{
        "prompt": [{"role": "system", "content": cfg.tasks.system_prompt},
                   {"role": "user", "content": cfg.tasks.prompt_template.format(question=q.prompt)}],
        "answer": q.answer, "question_id": q.question_id} for q in questions])
    score = reward_fn_for(cfg.reward)

    def reward(prompts, completions, answer, question_id, **_):
        return [score(c[0]["content"], Question(i, "", a)).reward for c, a, i in zip(completions, answer, question_id)]

    completions_per_step = rollout.questions_per_step * rollout.group_size
    accumulation = completions_per_step // learner.micro_batch_size
    config = GRPOConfig(
        output_dir=str(Path(args.out) / "trl-run"), max_steps=args.steps, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, bf16=cfg.model.dtype == "bfloat16", seed=cfg.train.seed, shuffle_dataset=False,
        per_device_train_batch_size=learner.micro_batch_size, gradient_accumulation_steps=accumulation,
        num_generations=rollout.group_size, max_completion_length=rollout.max_tokens,
        temperature=rollout.temperature, top_p=rollout.top_p, learning_rate=learner.lr,
        warmup_steps=learner.warmup_steps, lr_scheduler_type="constant_with_warmup", max_grad_norm=learner.grad_clip,
        adam_beta1=learner.betas[0], adam_beta2=learner.betas[1], weight_decay=learner.weight_decay,
        beta=algorithm.kl_coef, epsilon=algorithm.clip_low, epsilon_high=algorithm.clip_high, num_iterations=1,
        loss_type="dapo",  # token-level, normalized by the batch's tokens: our `aggregation: token`
        scale_rewards="group", use_vllm=args.use_vllm, vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.1, vllm_enable_sleep_mode=False,
    )
    timer = StepTimer(TrainerCallback)
    trainer = GRPOTrainer(model=resolve_model(cfg.model.name), reward_funcs=reward, args=config,
                          train_dataset=dataset, callbacks=[timer.callback])
    started = time.perf_counter()
    trainer.train()
    steps = timer.seconds[1:] or timer.seconds  # the first step includes warm-up
    result = {"bench": "trl", "use_vllm": args.use_vllm, "overrides": args.overrides,
              "steps": len(timer.seconds), "step_s": timer.seconds,
              "step_s_median": round(statistics.median(steps), 2), "seconds": round(time.perf_counter() - started, 1),
              "questions_per_s": round(rollout.questions_per_step / statistics.median(steps), 4)}
    (Path(args.out) / f"trl{'-vllm' if args.use_vllm else ''}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


class StepTimer:
    """Wall time of each optimizer step, from TRL's (transformers') step callbacks."""

    def __init__(self, base):
        self.seconds: list[float] = []
        timer = self

        class Callback(base):
            def on_step_begin(self, *args, **kwargs):
                timer._started = time.perf_counter()

            def on_step_end(self, *args, **kwargs):
                timer.seconds.append(time.perf_counter() - timer._started)

        self.callback = Callback()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--use-vllm", action="store_true", help="TRL's colocated vLLM engine (else HF generate)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="a config override, the same as `bench.py step --set`, e.g. model.dtype=float32")
    parser.add_argument("--out", default="runs/bench")
    return parser


if __name__ == "__main__":
    sys.exit(main())
