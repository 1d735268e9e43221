"""Rewards: a math verifier, the reward kinds built on it, and a guard against hung reward code.

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
import multiprocessing
import pickle
import re
import weakref
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


def last_number_matches(completion: str, reference: str) -> bool:
    number = last_number(completion)
    return number is not None and answers_match(number, reference)


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
    right = check.correct if check.formatted else last_number_matches(completion, question.answer)
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


def build_reward_fn(
    kind: str, answer_pattern: str | None = None, format_weight: float = 0.1, custom: str | None = None
) -> RewardFn:
    """The reward function for `kind`, as a picklable callable `fn(completion, question)`."""
    if answer_pattern is not None:
        _compile_pattern(answer_pattern)  # fail now, not inside the first rollout
    settings = RewardSettings(answer_pattern=answer_pattern, format_weight=format_weight)
    if kind == "custom":
        if not custom:
            raise RewardConfigError("reward.kind is 'custom' but reward.custom is not set; "
                                    "set reward.custom=package.module:function")
        load_custom_reward(custom)
        return functools.partial(_custom, settings=settings, path=custom)
    if custom:
        raise RewardConfigError(f"reward.custom is set but reward.kind is {kind!r}; set reward.kind=custom "
                                "to use it, or remove reward.custom")
    if kind not in REWARD_KINDS:
        known = ", ".join([*REWARD_KINDS, "custom"])
        raise RewardConfigError(f"unknown reward.kind {kind!r}; choose one of: {known}")
    return functools.partial(REWARD_KINDS[kind], settings=settings)


# ---------------------------------------------------------------- the hang guard

_MAX_ERROR_CHARS = 500


def _score_one(reward_fn: RewardFn, completion: str, question: Question) -> tuple[str, Any]:
    try:
        result = reward_fn(completion, question)
        _check_result(result)
    except Exception as exc:  # user code: any exception becomes that item's failure reward
        return "raised", f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
    return "ok", result


def _check_result(result: object) -> None:
    # A NaN or a non-number here would poison every advantage of its group downstream.
    if not isinstance(result, RewardResult):
        raise TypeError(f"reward function returned {type(result).__name__}, expected RewardResult")
    if isinstance(result.reward, bool) or not isinstance(result.reward, (int, float)):
        raise TypeError(f"reward function returned a reward of type {type(result.reward).__name__}")
    if not math.isfinite(result.reward):
        raise ValueError(f"reward function returned a non-finite reward ({result.reward})")


def _worker_main(conn: Any, reward_fn: RewardFn) -> None:
    """The scoring process: score each received batch, one reply per item, in order."""
    conn.send(("ready", None))
    while True:
        try:
            batch = conn.recv()
        except EOFError:
            return  # the parent is gone; do not linger as an orphan
        if batch is None:
            return
        for completion, question in batch:
            conn.send(_score_one(reward_fn, completion, question))


def _stop_process(process: Any, conn: Any, graceful: bool) -> None:
    if graceful and process.is_alive():
        try:
            conn.send(None)
            process.join(2.0)
        except (OSError, ValueError):  # pipe already broken: the process is dying anyway
            pass
    if process.is_alive():
        process.kill()
    process.join(5.0)
    conn.close()


class _Worker:
    """One scoring process and the parent's end of its pipe."""

    def __init__(self, ctx: Any, reward_fn: RewardFn) -> None:
        parent_conn, child_conn = ctx.Pipe()
        # daemon: the interpreter kills it at exit rather than waiting on a hung reward.
        self.process = ctx.Process(target=_worker_main, args=(child_conn, reward_fn),
                                   name="innerloop-reward-scorer", daemon=True)
        self.process.start()
        child_conn.close()  # now only the child holds it, so the child's death reads as EOF here
        self.conn = parent_conn
        self.ready = False
        self._finalizer = weakref.finalize(self, _stop_process, self.process, self.conn, True)

    def wait_ready(self, timeout_s: float) -> None:
        if self.ready:
            return
        if not self.conn.poll(timeout_s):
            self.stop(graceful=False)
            raise RuntimeError(f"the reward scoring process did not start within {timeout_s:g}s")
        try:
            self.conn.recv()
        except EOFError:
            self.process.join(5.0)
            code = self.process.exitcode
            self.stop(graceful=False)
            raise RuntimeError(
                f"the reward scoring process exited while starting (exit code {code}); the reward "
                "function could not be loaded there - is its module importable in a fresh process? "
                "See its traceback above."
            ) from None
        self.ready = True

    def stop(self, graceful: bool) -> None:
        if self._finalizer.detach() is not None:  # None: already stopped
            _stop_process(self.process, self.conn, graceful)


class GuardedScorer:
    """Scores completions in a persistent child process so reward code can neither hang nor crash us.

    A reward that raises gets `failure_reward` with error "raised: ..."; one that runs past
    `timeout_s` has its process killed and restarted, gets `failure_reward` with error
    "timed out after Xs", and the rest of the batch goes on. Not thread-safe: one caller at a time.
    The process is a daemon, so reward code may run `subprocess` but not start multiprocessing children.
    """

    _CHUNK = 256  # items per message: bounds message size; the worker idles one round trip per chunk

    def __init__(self, reward_fn: RewardFn, timeout_s: float, failure_reward: float,
                 start_timeout_s: float = 120.0) -> None:
        if not timeout_s > 0:
            raise ValueError(f"reward timeout_s must be > 0 seconds, got {timeout_s}")
        try:
            pickle.dumps(reward_fn)
        except Exception as exc:  # pickling errors come as several types
            raise TypeError("the reward function must be picklable (a top-level function or a "
                            f"functools.partial of one) to run in the scoring process: {exc}") from exc
        self.timeout_s = float(timeout_s)
        self.failure_reward = float(failure_reward)
        self.start_timeout_s = start_timeout_s
        self._reward_fn = reward_fn
        self._ctx = multiprocessing.get_context("spawn")  # fork is unsafe beside Ray/torch threads
        self._stats = {"scored": 0, "raised": 0, "timed_out": 0, "died": 0, "restarts": 0}
        self._closed = False
        self._worker: _Worker | None = _Worker(self._ctx, reward_fn)  # starts now, waited for later

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def score(self, items: list[tuple[str, Question]]) -> list[RewardResult]:
        """One RewardResult per (completion, question), in order."""
        results: list[RewardResult] = []
        try:
            while len(results) < len(items):
                worker = self._ready_worker()
                chunk = items[len(results) : len(results) + self._CHUNK]
                worker.conn.send(list(chunk))
                results.extend(self._collect(worker, len(chunk)))
        except BaseException:
            # Interrupted mid-batch (Ctrl-C, a worker that would not start): its unread replies
            # must not be taken for the next batch's, so that worker goes; the next call starts one.
            if self._worker is not None:
                self._worker.stop(graceful=False)
                self._worker = None
            raise
        self._stats["scored"] += len(items)
        return results

    def _ready_worker(self) -> _Worker:
        if self._closed:
            raise RuntimeError("this GuardedScorer is closed")
        if self._worker is None:
            self._worker = _Worker(self._ctx, self._reward_fn)
        self._worker.wait_ready(self.start_timeout_s)
        return self._worker

    def _collect(self, worker: _Worker, count: int) -> list[RewardResult]:
        """Results for one sent chunk; stops early (and restarts the worker) if an item fails hard.

        Items run one after another, so each result's wait starts when the previous one arrived:
        a timeout belongs to exactly one item.
        """
        out: list[RewardResult] = []
        while len(out) < count:
            if not worker.conn.poll(self.timeout_s):
                self._stats["timed_out"] += 1
                out.append(self._failure(f"timed out after {self.timeout_s:g}s"))
                self._restart(worker)
                return out
            try:
                status, payload = worker.conn.recv()
            except EOFError:  # the reward code killed its process (os._exit, segfault, ...)
                worker.process.join(5.0)
                self._stats["died"] += 1
                out.append(self._failure(f"scoring process died (exit code {worker.process.exitcode})"))
                self._restart(worker)
                return out
            if status == "ok":
                out.append(payload)
            else:
                self._stats["raised"] += 1
                out.append(self._failure(f"raised: {payload}"))
        return out

    def _failure(self, error: str) -> RewardResult:
        return RewardResult(self.failure_reward, False, False, error=error)

    def _restart(self, worker: _Worker) -> None:
        worker.stop(graceful=False)
        self._stats["restarts"] += 1
        self._worker = _Worker(self._ctx, self._reward_fn)

    def close(self) -> None:
        self._closed = True
        if self._worker is not None:
            self._worker.stop(graceful=True)
            self._worker = None

    def __enter__(self) -> GuardedScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
