"""Rewards: a math verifier and the reward kinds built on it (the hang guard is in scoring.py).

The verifier finds the completion's final answer (the last complete `\\boxed{...}`, or the last match
of a configured regex with one group) and compares it with the reference through `math_verify`, so
"025" == "25", "1/2" == "0.5" == "\\frac{1}{2}" and "1,000" == "1000".

`math_verify` guards its own parse/verify calls with SIGALRM, which only works on a process's main
thread and only with whole seconds. We switch that off (`parsing_timeout=None`,
`timeout_seconds=None`) so the verifier runs on any thread; `GuardedScorer` does the timing instead,
in a separate process it can kill.

Reward kinds are small registered functions chosen once by name (`REWARD_KINDS`). Every kind
returns a `RewardResult` whose `correct` always means the *formatted* answer is right (strict).
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from math_verify import parse, verify
from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

from innerloop.distributed.records import Question, RewardResult

RewardFn = Callable[[str, Question], RewardResult]


class RewardConfigError(ValueError):
    """A reward setting that cannot work; the message names the setting and the fix."""


class _DropTimeoutDisabledWarning(logging.Filter):
    # math_verify warns once per process that its timeout is off; here that is deliberate
    # (GuardedScorer times the call), so the warning would only mislead a reader of the logs.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


# ---------------------------------------------------------------- answer extraction

_BOXED = re.compile(r"\\boxed\s*\{")
# A number as people write it: optional sign, thousands commas, decimals, a simple fraction.
# The lookbehind keeps "x3" and the "-3" of "5-3" from counting as numbers.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")


def last_boxed(text: str) -> str | None:
    """Contents of the last complete `\\boxed{...}` (nested braces kept); None if none closes.

    One pass with a brace stack, so a completion full of unclosed boxes costs linear time.
    "Last" is the box that closes last: for `\\boxed{\\boxed{5}}` that is the outer one.
    """
    box_starts = {m.end() - 1 for m in _BOXED.finditer(text)}  # index of each box's "{"
    stack: list[int] = []
    best: tuple[int, int] | None = None
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # "\{" and "\}" are literal braces in LaTeX, not groups
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            opened = stack.pop()
            if opened in box_starts:
                best = (opened + 1, i)
        i += 1
    return None if best is None else text[best[0] : best[1]]


def extract_answer(completion: str, answer_pattern: str | None = None) -> str | None:
    """The completion's final answer in the configured format, or None when the format is absent."""
    if answer_pattern is None:
        answer = last_boxed(completion)
    else:
        matches = list(_compile_pattern(answer_pattern).finditer(completion))
        answer = matches[-1].group(1) if matches else None
    if answer is None:
        return None
    answer = answer.strip().strip("$").strip()  # "$5$" inside a box or a pattern group
    return answer or None  # an empty box states no answer


def last_number(text: str) -> str | None:
    """The last number written in the text (the unformatted-answer fallback of `four_way`)."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


@functools.lru_cache(maxsize=64)
def _compile_pattern(answer_pattern: str) -> re.Pattern[str]:
    try:
        pattern = re.compile(answer_pattern)
    except re.error as exc:
        raise RewardConfigError(f"reward.answer_pattern {answer_pattern!r} is not a valid regex: {exc}") from exc
    if pattern.groups != 1:
        raise RewardConfigError(
            f"reward.answer_pattern {answer_pattern!r} has {pattern.groups} groups; it needs exactly one "
            "capturing group around the answer, e.g. 'Answer: (.+)' (use (?:...) for any other group)"
        )
    return pattern


# ---------------------------------------------------------------- comparison


@functools.lru_cache(maxsize=8192)
def _parse_answer(answer: str) -> tuple[Any, ...]:
    """Sympy forms of an answer string; cached because G completions share one reference."""
    # As LaTeX first ("\frac12", "- 3", "1,000"); plain-expression parsing is the fallback for
    # answers the LaTeX grammar rejects. Both with math_verify's SIGALRM timeout off (see top).
    latex = parse(f"${answer}$", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)
    if latex:
        return tuple(latex)
    return tuple(parse(answer, extraction_config=[ExprExtractionConfig()], parsing_timeout=None))


# Letters a mathematical answer may hold in a row: units in \text{...} and the like, LaTeX commands,
# and these function names are removed first; any other run of letters is a word.
_MATH_NAMES = re.compile(r"\\(?:text|mathrm|textbf|mbox|operatorname)\s*\{[^}]*\}|\\[A-Za-z]+"
                         r"|\b(?:sqrt|frac|sin|cos|tan|cot|sec|csc|log|ln|exp|pi|inf|infty|mod)\b")
_WORD = re.compile(r"[A-Za-z]{2,}")


def answer_is_parsable(answer: str) -> bool:
    """Whether the verifier can read a reference answer as a mathematical value. One it cannot is never
    matched; one made of words ("seven") would parse as a product of letters, and any anagram of it
    would then be graded correct, so words are refused too."""
    if _WORD.search(_MATH_NAMES.sub(" ", answer)):
        return False
    try:
        parsed = _parse_answer(answer.strip())
    except Exception:  # math_verify raises on some malformed LaTeX rather than returning nothing
        return False
    # The parse always echoes the input string; only a mathematical object beside it can be compared.
    return any(not isinstance(form, str) for form in parsed)


def answers_match(predicted: str, reference: str) -> bool:
    """True when the predicted answer equals the reference numerically or symbolically."""
    gold, target = _parse_answer(reference.strip()), _parse_answer(predicted.strip())
    if not gold or not target:
        # Nothing math_verify can read (e.g. a free-text answer): exact text is all we can judge.
        return " ".join(predicted.split()) == " ".join(reference.split())
    return verify(list(gold), list(target), timeout_seconds=None)


@dataclass(frozen=True)
class AnswerCheck:
    formatted: bool  # the configured answer format is present
    correct: bool  # the formatted answer matches the reference


def check_answer(completion: str, reference: str, answer_pattern: str | None = None) -> AnswerCheck:
    answer = extract_answer(completion, answer_pattern)
    if answer is None:
        return AnswerCheck(formatted=False, correct=False)
    return AnswerCheck(formatted=True, correct=answers_match(answer, reference))


# ---------------------------------------------------------------- reward kinds


@dataclass(frozen=True)
class RewardSettings:
    answer_pattern: str | None = None  # regex with one group; None: the last \boxed{}
    format_weight: float = 0.1  # correct_plus_format: a small nudge, never worth a wrong answer


def _correctness(completion: str, question: Question, settings: RewardSettings) -> RewardResult:
    check = check_answer(completion, question.answer, settings.answer_pattern)
    return RewardResult(float(check.correct), check.correct, check.formatted)


def _format(completion: str, question: Question, settings: RewardSettings) -> RewardResult:
    check = check_answer(completion, question.answer, settings.answer_pattern)
    return RewardResult(float(check.formatted), check.correct, check.formatted)


# (answer right, format right) -> reward; the paper's table.
_FOUR_WAY = {(True, True): 1.0, (False, True): 0.0, (True, False): -0.5, (False, False): -1.0}


def _four_way(completion: str, question: Question, settings: RewardSettings) -> RewardResult:
    check = check_answer(completion, question.answer, settings.answer_pattern)
    # Without the format there is no formatted answer to judge; the last number stands in for it,
    # so "right answer, wrong format" is told apart from "wrong answer, wrong format".
    number = None if check.formatted else last_number(completion)
    right = check.correct if check.formatted else number is not None and answers_match(number, question.answer)
    return RewardResult(_FOUR_WAY[(right, check.formatted)], check.correct, check.formatted)


def _correct_plus_format(completion: str, question: Question, settings: RewardSettings) -> RewardResult:
    check = check_answer(completion, question.answer, settings.answer_pattern)
    reward = float(check.correct) + settings.format_weight * float(check.formatted)
    return RewardResult(reward, check.correct, check.formatted)


REWARD_KINDS: dict[str, Callable[[str, Question, RewardSettings], RewardResult]] = {
    "correctness": _correctness,
    "format": _format,
    "four_way": _four_way,
    "correct_plus_format": _correct_plus_format,
}


def load_custom_reward(path: str) -> Callable[..., Any]:
    """Import "package.module:function" and check it is callable; errors say what to fix."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise RewardConfigError(f"reward.custom={path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure while importing user code is a config problem
        raise RewardConfigError(
            f"reward.custom={path!r}: module {module_name!r} could not be imported "
            f"({type(exc).__name__}: {exc}); make sure it is on PYTHONPATH on every worker"
        ) from exc
    fn = module
    for part in attr.split("."):  # "module:Class.method" works too
        if not hasattr(fn, part):
            raise RewardConfigError(f"reward.custom={path!r}: {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise RewardConfigError(f"reward.custom={path!r} names a {type(fn).__name__}, not a function")
    return fn


_load_custom_cached = functools.lru_cache(maxsize=8)(load_custom_reward)


def _custom(completion: str, question: Question, settings: RewardSettings, path: str) -> RewardResult:
    # The path, not the function, travels to the scoring process; it is imported there once.
    out = _load_custom_cached(path)(completion, question)
    if isinstance(out, RewardResult):
        return out  # the user's own judgement of correct/formatted is kept as given
    if isinstance(out, bool) or not isinstance(out, (int, float)):
        raise TypeError(f"custom reward {path} returned {type(out).__name__}; return a float or RewardResult")
    if not math.isfinite(out):
        raise ValueError(f"custom reward {path} returned {out}; rewards must be finite")
    check = check_answer(completion, question.answer, settings.answer_pattern)
    return RewardResult(float(out), check.correct, check.formatted)


def reward_fn_for(reward) -> RewardFn:
    """The reward function a run's `reward` config section asks for."""
    from innerloop.actors.reward_mix import components_of

    return build_reward_fn(reward.kind, reward.answer_pattern, reward.format_weight, reward.custom,
                           components_of(reward), reward.failure_reward)


def build_reward_fn(
    kind: str, answer_pattern: str | None = None, format_weight: float = 0.1, custom: str | None = None,
    functions: tuple = (), failure_reward: float = -1.0,
) -> RewardFn:
    """The reward function for `kind` (or, given `functions`, their weighted sum: reward_mix.py), as a
    picklable callable `fn(completion, question, completion_ids=())`."""
    if answer_pattern is not None:
        _compile_pattern(answer_pattern)  # fail now, not inside the first rollout
    settings = RewardSettings(answer_pattern=answer_pattern, format_weight=format_weight)
    if functions:
        from innerloop.actors.reward_mix import resolve, score_mix

        for component in functions:
            try:
                resolve(component, REWARD_KINDS)  # fails now, naming the entry
            except ValueError as exc:
                raise RewardConfigError(f"reward.functions: {exc}") from None
        return functools.partial(score_mix, components=tuple(functions), settings=settings,
                                 failure_reward=failure_reward)
    if kind == "custom":
        if not custom:
            raise RewardConfigError("reward.kind is 'custom' but reward.custom is not set; "
                                    "set reward.custom=package.module:function")
        load_custom_reward(custom)
        return _ignoring_ids(functools.partial(_custom, settings=settings, path=custom))
    if custom:
        raise RewardConfigError(f"reward.custom is set but reward.kind is {kind!r}; set reward.kind=custom "
                                "to use it, or remove reward.custom")
    if kind not in REWARD_KINDS:
        known = ", ".join([*REWARD_KINDS, "custom"])
        raise RewardConfigError(f"unknown reward.kind {kind!r}; choose one of: {known}")
    return _ignoring_ids(functools.partial(REWARD_KINDS[kind], settings=settings))


@dataclass(frozen=True)
class _ignoring_ids:  # noqa: N801 - used like a function
    """A reward of (completion, question) called as every reward is, with the completion's ids too."""

    fn: Callable[[str, Question], RewardResult]

    def __call__(self, completion: str, question: Question, completion_ids: tuple[int, ...] = ()) -> RewardResult:
        return self.fn(completion, question)
