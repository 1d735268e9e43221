"""The config's sections about the data and the judge: tasks and rewards.

Part of the typed config (distributed/config.py assembles the sections and re-exports these).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from innerloop.distributed.config_base import Section


class RewardFunction(Section):
    name: str  # a reward kind, "trl:NAME" or "package.module:function"
    weight: float = 1.0
    args: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of a factory


class TaskConfig(Section):
    source: Literal["synthetic", "dataset"] = "synthetic"
    kind: Literal["addition", "arithmetic", "word", "mixed"] = "arithmetic"  # synthetic only
    difficulty: int = Field(1, ge=1, le=6)  # digits per operand / operations / steps
    train_count: int = Field(1000, ge=1)  # training questions in the pool
    eval_count: int = Field(200, ge=1)  # held-out questions, never trained on
    seed: int = 0
    # A local dataset: JSONL, Parquet, or a `datasets.save_to_disk` folder.
    path: str | None = None
    question_field: str = "question"
    answer_field: str = "answer"
    id_field: str | None = None
    on_bad_row: Literal["skip", "fail"] = "skip"  # rows missing a field: skip and count, or stop
    # A conversational dataset (TRL's format): point question_field at a column of chat messages,
    # e.g. tasks.question_field=prompt; a row's own system message replaces system_prompt there, and
    # prompt_template does not apply (the messages are the prompt as written).
    system_prompt: str = (
        "You are a careful math tutor. Solve the problem, then give the final answer "
        "as \\boxed{N}. Example: What is 3 + 4? 3 + 4 = 7. The answer is \\boxed{7}."
    )
    # {question} is replaced by the question text.
    prompt_template: str = "{question}\nPut the final answer in \\boxed{{}}."

    @model_validator(mode="after")
    def _dataset_needs_path(self) -> "TaskConfig":
        if self.source == "dataset" and not self.path:
            raise ValueError("tasks.source is 'dataset' but tasks.path is not set; set tasks.path=FILE")
        _check_prompt_template(self.prompt_template)
        return self


def _check_prompt_template(template: str) -> None:
    """The template is filled with str.format(question=...): any other placeholder, or a lone brace,
    would fail at the first rollout; literal braces are written doubled ({{ and }})."""
    try:
        filled = template.format(question="\0")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"tasks.prompt_template {template!r} cannot be filled: {exc!r}. Its only placeholder is "
                         "{question}; write a literal brace doubled ({{ or }}), e.g. \\boxed{{}}") from None
    if "\0" not in filled:
        raise ValueError(f"tasks.prompt_template {template!r} must contain '{{question}}'")


class RewardConfig(Section):
    # correctness | format | four_way (1 / 0 / -0.5 / -1) | correct_plus_format | custom
    kind: str = "four_way"
    answer_pattern: str | None = None  # regex with one group; None means the last \boxed{}
    format_weight: float = 0.1  # correct_plus_format only
    custom: str | None = None  # "package.module:function" when kind is custom
    timeout_s: float = Field(5.0, gt=0.0)  # per completion; a hung reward gets failure_reward
    failure_reward: float = -1.0
    # Several weighted rewards instead of `kind` (actors/reward_mix.py): each entry a reward kind,
    # "trl:NAME" (TRL's rewards, e.g. trl:accuracy_reward) or "package.module:function" with TRL's
    # signature; a name, or {name, weight, args} (args: a factory's, e.g. for
    # trl:get_soft_overlong_punishment). The reward is the weighted sum; each part is logged per step.
    functions: list[str | RewardFunction] = Field(default_factory=list)
    weights: list[float] | None = None  # one per function (TRL's reward_weights); else each entry's weight

    @property
    def weighted(self) -> list[RewardFunction]:
        """reward.functions as entries, each with its weight (reward.weights first)."""
        entries = [RewardFunction(name=f) if isinstance(f, str) else f for f in self.functions]
        if self.weights is not None:
            entries = [entry.model_copy(update={"weight": w}) for entry, w in zip(entries, self.weights)]
        return entries

    @model_validator(mode="after")
    def _weights_match_functions(self) -> "RewardConfig":
        if self.weights is not None and len(self.weights) != len(self.functions):
            raise ValueError(f"reward.weights has {len(self.weights)} values for {len(self.functions)} "
                             "reward.functions; give one weight per function, or none (each then weighs 1)")
        if self.functions and self.kind == "custom":
            raise ValueError("reward.functions replaces reward.kind; list the custom function in reward.functions "
                             "(with TRL's signature) instead of reward.kind=custom")
        return self

    @model_validator(mode="after")
    def _custom_needs_path(self) -> "RewardConfig":
        if self.kind == "custom" and not self.custom:
            raise ValueError("reward.kind is 'custom' but reward.custom is not set; "
                             "set reward.custom=package.module:function")
        return self

