"""Several weighted rewards (reward.functions): innerloop's reward kinds and TRL-style functions.

An entry names one of three things:
- one of innerloop's reward kinds ("four_way", "correctness", ...), called as `f(completion, question)`;
- one of TRL's built-in rewards, "trl:accuracy_reward" (a factory such as
  "trl:get_soft_overlong_punishment" is called with the entry's `args` first);
- a function of the user's, "package.module:function", with TRL's signature
  `f(completions, **columns) -> list[float | None]` (a factory, where `args` are given).

TRL-style functions are called one completion at a time, as TRL's GRPOTrainer would call them on a
batch of one: `completions` in conversational form (innerloop always prompts through the chat
template), `prompts`, `completion_ids`, and every column of the question's dataset row (`solution`
defaults to the reference answer where the row has none, for TRL's accuracy reward). A function
that returns None for the completion leaves it out of that component, as TRL does: the weighted
sum runs over the components that gave a number. A component that raises, returns the wrong
length or a non-number takes the failure reward, with its error kept; the others still count.
`correct` and `formatted` always come from innerloop's verifier, so accuracy means one thing in
every run. The whole mix runs in the scoring process under the reward timeout (scoring.py).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from innerloop.distributed.records import Question, RewardResult

TRL_PREFIX = "trl:"


@dataclass(frozen=True)
class Component:
    name: str  # as configured: a kind, "trl:NAME" or "package.module:function"
    weight: float = 1.0
    args: tuple[tuple[str, Any], ...] = field(default_factory=tuple)  # a factory's keyword arguments

    @property
    def label(self) -> str:
        """Its name in the logs: the function's own name."""
        return self.name.rpartition(":")[2].rpartition(".")[2] if ":" in self.name else self.name


def components_of(reward) -> tuple[Component, ...]:
    """reward.functions (RewardConfig.weighted) as components."""
    return tuple(Component(f.name, f.weight, tuple(sorted(f.args.items()))) for f in reward.weighted)


def resolve(component: Component, kinds: dict[str, Callable]) -> tuple[str, Callable]:
    """("kind" | "trl", the callable) for a component; raises ValueError naming what to fix."""
    if component.name in kinds:
        if component.args:
            raise ValueError(f"reward function {component.name!r} is one of innerloop's reward kinds, which take no args")
        return "kind", kinds[component.name]
    if component.name.startswith(TRL_PREFIX):
        target = _trl_reward(component.name.removeprefix(TRL_PREFIX))
    else:
        target = _imported(component.name)
    if component.args:
        try:
            target = target(**dict(component.args))
        except TypeError as exc:
            raise ValueError(f"reward function {component.name!r} could not be made with args "
                             f"{dict(component.args)}: {exc}") from None
    if not callable(target):
        raise ValueError(f"reward function {component.name!r} is a {type(target).__name__}, not a function")
    return "trl", target


def _trl_reward(name: str) -> Callable:
    try:
        import trl.rewards
    except ImportError as exc:
        raise ValueError(f"reward function 'trl:{name}' needs TRL ({exc}); pip install trl") from None
    found = getattr(trl.rewards, name, None)
    if found is None or name.startswith("_"):
        known = ", ".join(n for n in dir(trl.rewards) if not n.startswith("_") and callable(getattr(trl.rewards, n)))
        raise ValueError(f"TRL has no reward 'trl:{name}'; its rewards: {known}")
    return found


def _imported(path: str) -> Callable:
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {path!r} must be a reward kind, 'trl:NAME' or 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # user code failing at import is a config problem
        raise ValueError(f"reward function {path!r}: module {module_name!r} could not be imported "
                         f"({type(exc).__name__}: {exc}); make sure it is on PYTHONPATH on every worker") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"reward function {path!r}: {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    return target


_RESOLVED: dict[str, tuple[str, Callable]] = {}


def _resolved(component: Component) -> tuple[str, Callable]:
    """In the scoring process, each component is imported (and a factory called) once."""
    from innerloop.actors.rewards import REWARD_KINDS

    key = repr(component)  # args may hold lists: not hashable
    if key not in _RESOLVED:
        _RESOLVED[key] = resolve(component, REWARD_KINDS)
    return _RESOLVED[key]


def score_mix(completion: str, question: Question, completion_ids: tuple[int, ...] = (), *,
              components: tuple[Component, ...], settings: Any, failure_reward: float) -> RewardResult:
    """The weighted sum of every component's reward for one completion (picklable as a partial)."""
    from innerloop.actors.rewards import check_answer

    parts = []
    for component in components:
        kind, fn = _resolved(component)
        try:
            value = _call(kind, fn, completion, question, completion_ids, settings)
            parts.append((component.label, value, ""))
        except Exception as exc:  # the user's function: one component fails, the others count
            parts.append((component.label, failure_reward, f"{type(exc).__name__}: {exc}"[:300]))
    total = sum(c.weight * value for c, (_, value, _) in zip(components, parts) if value is not None)
    check = check_answer(completion, question.answer, settings.answer_pattern)
    errors = "; ".join(f"{label} {error}" for label, _, error in parts if error)
    return RewardResult(float(total), check.correct, check.formatted, error=errors, components=tuple(parts))


def _call(kind: str, fn: Callable, completion: str, question: Question, completion_ids: tuple[int, ...],
          settings: Any) -> float | None:
    if kind == "kind":
        return fn(completion, question, settings).reward
    out = fn(**trl_arguments(completion, question, completion_ids))
    if not isinstance(out, (list, tuple)) or len(out) != 1:
        raise TypeError(f"returned {type(out).__name__} of length {len(out) if hasattr(out, '__len__') else '-'}; "
                        "a TRL reward returns a list with one value per completion")
    value = out[0]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"returned {value!r}; rewards must be finite numbers or None")
    return float(value)


def trl_arguments(completion: str, question: Question, completion_ids: tuple[int, ...]) -> dict[str, Any]:
    """What TRL's trainer passes a reward function, for a batch of this one completion."""
    columns = dict(question.columns)
    columns.setdefault("solution", question.answer)
    columns.setdefault("answer", question.answer)
    prompt = [{"role": role, "content": text} for role, text in question.messages] or \
        [{"role": "user", "content": question.prompt}]
    return {**{k: [v] for k, v in columns.items()}, "prompts": [prompt],
            "completions": [[{"role": "assistant", "content": completion}]], "completion_ids": [list(completion_ids)]}
