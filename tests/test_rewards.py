"""The verifier, the reward kinds, custom rewards by import path, and the hang guard."""

from __future__ import annotations

import math
import os
import pickle
import time

import pytest

from innerloop.actors.rewards import (
    RewardConfigError,
    build_reward_fn,
    check_answer,
    last_boxed,
    last_number,
)
from innerloop.actors.scoring import GuardedScorer
from innerloop.distributed.records import Question, RewardResult

Q = Question("q-25", "What is 20 + 5?", "25")

# Custom rewards are referenced by import path; `__name__` is whatever name pytest imported this
# module under, which the scoring process (spawned with the same sys.path) can import too.
HERE = __name__


def half_reward(completion: str, question: Question) -> float:
    return 0.5


def judging_reward(completion: str, question: Question) -> RewardResult:
    return RewardResult(0.25, correct=True, formatted=False)


def text_reward(completion: str, question: Question) -> str:
    return "great"


def nan_reward(completion: str, question: Question) -> float:
    return math.nan


NOT_CALLABLE = 3


def misbehaving(completion: str, question: Question) -> RewardResult:
    """Correctness, except on a few trigger words that make the reward code misbehave."""
    if completion == "RAISE":
        raise ValueError("boom")
    if completion == "HANG":
        time.sleep(60)
    if completion == "DIE":
        os._exit(3)
    if completion == "WRONG TYPE":
        return 1.0  # type: ignore[return-value]
    return build_reward_fn("correctness")(completion, question)


# ---------------------------------------------------------------- the verifier

VERIFIER_CASES = [
    # completion, reference, formatted, correct
    (r"so the sum is \boxed{25}", "25", True, True),  # right
    (r"\boxed{24}", "25", True, False),  # wrong
    (r"\boxed{25", "25", False, False),  # malformed: the box never closes
    ("I think it is 25", "25", False, False),  # no answer format
    ("", "25", False, False),
    (r"\boxed{}", "0", False, False),  # an empty box states no answer
    (r"\boxed{\frac{1}{2}}", "0.5", True, True),  # nested braces
    (r"\boxed{\dfrac{3}{4}}", "0.75", True, True),
    (r"\boxed{025}", "25", True, True),
    (r"\boxed{1/2}", "0.5", True, True),
    (r"\boxed{0.5}", r"\frac{1}{2}", True, True),
    (r"\boxed{1,000}", "1000", True, True),
    (r"\boxed{-7}", "-7", True, True),  # negative numbers
    (r"\boxed{7}", "-7", True, False),
    (r"\boxed{-7}", "7", True, False),
    (r"\boxed {25}", "25", True, True),
    (r"$\boxed{x = 5}$", "5", True, True),
    (r"\boxed{\{1, 2\}}", r"\{2, 1\}", True, True),  # escaped braces stay inside the box
    (r"first \boxed{3}, then \boxed{25}", "25", True, True),  # the last box counts
    (r"first \boxed{25}, then \boxed{3}", "25", True, False),
    (r"\boxed{25} but then \boxed{3", "25", True, True),  # the last *complete* box
]


@pytest.mark.parametrize("completion, reference, formatted, correct", VERIFIER_CASES)
def test_verifier_table(completion: str, reference: str, formatted: bool, correct: bool) -> None:
    check = check_answer(completion, reference)
    assert (check.formatted, check.correct) == (formatted, correct)


PATTERN = r"The answer is (.+?)\."
PATTERN_CASES = [
    ("Adding gives 25. The answer is 25.", "25", True, True),
    ("The answer is 24.", "25", True, False),
    ("The answer is 3. No wait. The answer is 025.", "25", True, True),  # the last match counts
    (r"\boxed{25}", "25", False, False),  # in pattern mode a box is not the format
]


@pytest.mark.parametrize("completion, reference, formatted, correct", PATTERN_CASES)
def test_pattern_mode(completion: str, reference: str, formatted: bool, correct: bool) -> None:
    check = check_answer(completion, reference, answer_pattern=PATTERN)
    assert (check.formatted, check.correct) == (formatted, correct)


def test_last_boxed_and_last_number() -> None:
    assert last_boxed(r"\boxed{\boxed{5}}") == r"\boxed{5}"  # the outer box closes last
    assert last_boxed(r"{ \boxed{5}") == "5"  # a stray brace outside does not matter
    assert last_boxed("no box here") is None
    assert last_number("5-3 is 2, so -7.") == "-7"
    assert last_number("it costs 1,000 dollars") == "1,000"
    assert last_number("x3 and 5-3") == "3"
    assert last_number("no digits") is None


# ---------------------------------------------------------------- reward kinds

FOUR_WAY_CASES = [
    (r"\boxed{25}", 1.0),  # right answer, right format
    (r"\boxed{24}", 0.0),  # wrong answer, right format
    ("20 + 5 = 25", -0.5),  # right answer (the last number), no format
    (r"\boxed{25", -0.5),  # an unclosed box is not the format
    ("20 + 5 = 24", -1.0),  # wrong answer, no format
    ("no idea", -1.0),
]


@pytest.mark.parametrize("completion, reward", FOUR_WAY_CASES)
def test_four_way(completion: str, reward: float) -> None:
    result = build_reward_fn("four_way")(completion, Q)
    assert result.reward == reward
    assert result.correct == (reward == 1.0)  # `correct` stays strict: formatted and right


@pytest.mark.parametrize("kind, completion, reward", [
    ("correctness", r"\boxed{25}", 1.0),
    ("correctness", "25", 0.0),
    ("format", r"\boxed{24}", 1.0),
    ("format", "24", 0.0),
    ("correct_plus_format", r"\boxed{25}", 1.25),
    ("correct_plus_format", r"\boxed{24}", 0.25),
    ("correct_plus_format", "25", 0.0),
])
def test_simple_kinds(kind: str, completion: str, reward: float) -> None:
    assert build_reward_fn(kind, format_weight=0.25)(completion, Q).reward == reward


@pytest.mark.parametrize("kind", ["correctness", "format", "four_way", "correct_plus_format"])
def test_reward_fns_pickle(kind: str) -> None:
    fn = build_reward_fn(kind, answer_pattern=PATTERN)
    again = pickle.loads(pickle.dumps(fn))
    assert again("The answer is 25.", Q) == fn("The answer is 25.", Q)


def test_config_errors_name_the_fix() -> None:
    with pytest.raises(RewardConfigError, match="choose one of: correctness"):
        build_reward_fn("corectness")
    with pytest.raises(RewardConfigError, match="exactly one"):
        build_reward_fn("correctness", answer_pattern=r"answer: \d+")
    with pytest.raises(RewardConfigError, match="not a valid regex"):
        build_reward_fn("correctness", answer_pattern="(unclosed")
    with pytest.raises(RewardConfigError, match="reward.kind=custom"):
        build_reward_fn("four_way", custom=f"{HERE}:half_reward")
    with pytest.raises(RewardConfigError, match="reward.custom is not set"):
        build_reward_fn("custom")


# ---------------------------------------------------------------- custom rewards


def test_custom_float_gets_strict_flags() -> None:
    fn = pickle.loads(pickle.dumps(build_reward_fn("custom", custom=f"{HERE}:half_reward")))
    assert fn(r"\boxed{25}", Q) == RewardResult(0.5, correct=True, formatted=True)
    assert fn("25", Q) == RewardResult(0.5, correct=False, formatted=False)


def test_custom_reward_result_passes_through() -> None:
    fn = build_reward_fn("custom", custom=f"{HERE}:judging_reward")
    assert fn("anything", Q) == RewardResult(0.25, correct=True, formatted=False)


@pytest.mark.parametrize("name, error", [("text_reward", TypeError), ("nan_reward", ValueError)])
def test_custom_bad_return_raises(name: str, error: type[Exception]) -> None:
    with pytest.raises(error, match=name):
        build_reward_fn("custom", custom=f"{HERE}:{name}")(r"\boxed{25}", Q)


@pytest.mark.parametrize("path, message", [
    ("no_such_package_xyz.rewards:fn", "could not be imported"),
    (f"{HERE}:no_such_function", "has no attribute"),
    (f"{HERE}:NOT_CALLABLE", "not a function"),
    ("missing_colon", "package.module:function"),
])
def test_custom_bad_path_errors_clearly(path: str, message: str) -> None:
    with pytest.raises(RewardConfigError, match=message):
        build_reward_fn("custom", custom=path)


# ---------------------------------------------------------------- the hang guard

TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def scorer():
    # One scorer for the module: a process start costs ~1 s.
    with GuardedScorer(misbehaving, timeout_s=TIMEOUT_S, failure_reward=-2.0) as guarded:
        yield guarded


def test_guard_scores_normally(scorer: GuardedScorer) -> None:
    results = scorer.score([(r"\boxed{25}", Q), (r"\boxed{1}", Q)])
    assert [r.reward for r in results] == [1.0, 0.0]
    assert scorer.score([]) == []


def test_guard_turns_a_raise_into_the_failure_reward(scorer: GuardedScorer) -> None:
    before = scorer.stats
    results = scorer.score([(r"\boxed{25}", Q), ("RAISE", Q), ("WRONG TYPE", Q), (r"\boxed{25}", Q)])
    assert results[1] == RewardResult(-2.0, False, False, error="raised: ValueError: boom")
    assert results[2].error.startswith("raised: TypeError") and results[2].reward == -2.0
    assert results[0].reward == results[3].reward == 1.0
    assert scorer.stats["raised"] == before["raised"] + 2
    assert scorer.stats["restarts"] == before["restarts"]  # a raise does not cost a restart


def test_guard_times_out_a_hang_and_goes_on(scorer: GuardedScorer) -> None:
    before = scorer.stats
    start = time.monotonic()
    results = scorer.score([(r"\boxed{25}", Q), ("HANG", Q), (r"\boxed{25}", Q), (r"\boxed{3}", Q)])
    elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT_S + 10  # the timeout plus a process restart, far from the 60 s sleep
    assert results[1] == RewardResult(-2.0, False, False, error=f"timed out after {TIMEOUT_S:g}s")
    assert [r.reward for r in results[:1] + results[2:]] == [1.0, 1.0, 0.0]
    assert scorer.stats["timed_out"] == before["timed_out"] + 1
    assert scorer.stats["restarts"] == before["restarts"] + 1
    assert scorer.score([(r"\boxed{25}", Q)])[0].reward == 1.0  # still usable


def test_guard_survives_the_reward_killing_its_process(scorer: GuardedScorer) -> None:
    results = scorer.score([("DIE", Q), (r"\boxed{25}", Q)])
    assert results[0].error == "scoring process died (exit code 3)"
    assert results[1].reward == 1.0


def test_guard_recovers_from_an_interrupted_batch(scorer: GuardedScorer) -> None:
    with pytest.raises(Exception):  # the batch itself cannot be sent (pickled)
        scorer.score([(r"\boxed{25}", Q), (lambda: "not text", Q)])  # type: ignore[list-item]
    assert scorer.score([(r"\boxed{25}", Q)])[0].reward == 1.0  # a fresh process, no stale replies


def test_guard_refuses_unpicklable_reward_fns() -> None:
    with pytest.raises(TypeError, match="picklable"):
        GuardedScorer(lambda c, q: RewardResult(0.0, False, False), timeout_s=1.0, failure_reward=0.0)


def test_guard_close_is_final() -> None:
    guarded = GuardedScorer(build_reward_fn("correctness"), timeout_s=5.0, failure_reward=0.0)
    process = guarded._worker.process  # type: ignore[union-attr]
    guarded.close()
    guarded.close()  # idempotent
    assert not process.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        guarded.score([(r"\boxed{25}", Q)])
