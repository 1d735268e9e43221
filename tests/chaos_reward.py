"""The chaos soak's reward (scripts/chaos.py): tests.doubles' length reward, which now and then hangs or
makes its group's rewards overflow, when the soak asks it to (a test double, never used by the product).

The soak asks by creating a file in the folder named by INNERLOOP_CHAOS_CONTROL (every process of the
run inherits the variable): `hang` or `nan`. The first scoring process to rename the file away takes the
request, so it happens once, in one completion (hang) or one group (nan), whichever worker scores first;
the renamed file holds the time it was taken, which the soak reads as the fault's time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.doubles import length_reward

CONTROL_ENV = "INNERLOOP_CHAOS_CONTROL"
HANG_S = 3600.0  # far past reward.timeout_s: the scorer's timeout must end it, or nothing would
# Finite in float32 (max 3.4e38), so the scorer lets it through; two of them in one group overflow the
# group's float32 sum, so its mean, its advantages and the loss are not finite: a NaN step.
HUGE_REWARD = 3.0e38
HUGE_PER_GROUP = 2  # not the whole group: a group of equal rewards has advantage 0, no overflow

_poisoned: dict[str, int] = {}  # question id -> huge rewards still to give (this scoring process)


def chaos_reward(completion: str, question) -> float:
    left = _poisoned.get(question.question_id, 0)
    if left:
        _poisoned[question.question_id] = left - 1
        return HUGE_REWARD
    if _take("nan"):
        _poisoned[question.question_id] = HUGE_PER_GROUP - 1
        return HUGE_REWARD
    if _take("hang"):
        time.sleep(HANG_S)
    return length_reward(completion, question)


def _take(request: str) -> bool:
    """Claim the soak's request, if it is there and no other scoring process got it first."""
    folder = os.environ.get(CONTROL_ENV)
    if not folder:
        return False
    asked, taken = Path(folder) / request, Path(folder) / f"{request}.taken-{os.getpid()}-{time.time():.3f}"
    try:
        asked.rename(taken)  # atomic: one taker
    except OSError:
        return False
    return True
