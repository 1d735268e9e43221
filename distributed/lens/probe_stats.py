"""The inner-loop probe's comparisons, with the controls the claim needs (pure: stdlib only).

A falling answer-NLL along correct trajectories says little by itself on short tasks: a correct
trajectory writes the reference answer before its end (copying it lowers the NLL), and correct and
incorrect trajectories usually come from different questions (easy ones against hard ones). So:

- every slope is given for the whole curve ("uncut") and for the curve cut before the reference
  answer first appears in the trajectory ("cut"; a trajectory with fewer than two points before it
  is left out of the cut figures);
- slopes per group are means over questions (each question's mean over its trajectories), with a
  95% t-interval over questions, since trajectories of one question are not independent;
- correct - incorrect is paired within questions: only questions with both, the difference of their
  mean slopes, its mean and 95% t-interval over those questions;
- correct - other_question compares a question's correct trajectories with the control: another
  question's trajectories read after this question's prompt (learners/probe.py, `control_items`),
  paired within the question in the same way;
- a comparison where a compared group holds fewer than MIN_TRAJECTORIES trajectories carries a
  warning, and the text says it is too small to conclude from.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Sequence

from innerloop.distributed.lens.sweep_stats import mean_ci

if TYPE_CHECKING:
    from innerloop.learners.probe import ProbeRecord

log = logging.getLogger(__name__)

MIN_TRAJECTORIES = 20  # per compared group, before a comparison is read as evidence
GROUPS = ("correct", "incorrect", "other_question")
CURVES = ("uncut", "cut")


@dataclass(frozen=True)
class Slopes:
    """One group's slopes (nats per whole trajectory) on one curve, over questions."""

    group: str
    curve: str  # uncut | cut
    trajectories: int
    questions: int
    mean: float | None  # mean over questions of each question's mean slope
    ci95_low: float | None  # t-interval over questions (None: fewer than 2)
    ci95_high: float | None


@dataclass(frozen=True)
class Paired:
    """a - b within questions that have both: the difference of their mean slopes."""

    a: str
    b: str
    curve: str
    questions: int
    trajectories_a: int
    trajectories_b: int
    difference: float | None
    ci95_low: float | None
    ci95_high: float | None
    warning: str  # "" when both groups hold at least MIN_TRAJECTORIES trajectories

    @property
    def excludes_zero(self) -> bool:
        return self.ci95_low is not None and (self.ci95_low > 0 or self.ci95_high < 0)


def _slope(record: "ProbeRecord", curve: str) -> float | None:
    summary = record.summary if curve == "uncut" else record.cut_summary
    return None if summary is None else summary.slope


def _by_question(records: Sequence["ProbeRecord"], group: str, curve: str) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    for r in records:
        value = _slope(r, curve)
        if r.group == group and value is not None:
            found.setdefault(r.question_id, []).append(value)
    return found


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def group_slopes(records: Sequence["ProbeRecord"], group: str, curve: str) -> Slopes:
    per_question = _by_question(records, group, curve)
    ci = mean_ci([_mean(v) for v in per_question.values()])
    return Slopes(group, curve, sum(len(v) for v in per_question.values()), len(per_question),
                  None if ci is None else ci.mean, None if ci is None else ci.low, None if ci is None else ci.high)


def paired(records: Sequence["ProbeRecord"], a: str, b: str, curve: str) -> Paired:
    first, second = _by_question(records, a, curve), _by_question(records, b, curve)
    shared = [q for q in first if q in second]
    ci = mean_ci([_mean(first[q]) - _mean(second[q]) for q in shared])
    count_a, count_b = sum(len(first[q]) for q in shared), sum(len(second[q]) for q in shared)
    small = [f"{name}: {count}" for name, count in ((a, count_a), (b, count_b)) if count < MIN_TRAJECTORIES]
    warning = (f"fewer than {MIN_TRAJECTORIES} trajectories in a compared group ({', '.join(small)}, over "
               f"{len(shared)} questions with both): too few to conclude from") if small else ""
    return Paired(a, b, curve, len(shared), count_a, count_b, None if ci is None else ci.mean,
                  None if ci is None else ci.low, None if ci is None else ci.high, warning)


def comparisons(records: Sequence["ProbeRecord"]) -> dict:
    """Every group's slopes and the two paired comparisons, on both curves, as one JSON-able mapping.
    Each comparison with too few trajectories is logged as a warning too."""
    pairs = [paired(records, "correct", other, curve) for other in ("incorrect", "other_question") for curve in CURVES]
    for p in pairs:
        if p.warning and (p.trajectories_a or p.trajectories_b):
            log.warning("probe %s - %s (%s curve): %s", p.a, p.b, p.curve, p.warning)
    return {"slopes": [asdict(group_slopes(records, g, c)) for g in GROUPS for c in CURVES],
            "paired": [asdict(p) | {"excludes_zero": p.excludes_zero} for p in pairs]}


def _interval(low: float | None, high: float | None) -> str:
    return "no interval (one question)" if low is None else f"[{low:+.3f}, {high:+.3f}]"


def format_comparisons(found: dict) -> str:
    lines = ["slopes (nats per whole trajectory; mean over questions, 95% CI):"]
    for s in found["slopes"]:
        if s["trajectories"]:
            lines.append(f"  {s['group']:>14} {s['curve']:>5}: {s['mean']:+.3f} {_interval(s['ci95_low'], s['ci95_high'])}"
                         f"  ({s['trajectories']} trajectories, {s['questions']} questions)")
    lines.append("paired within questions:")
    for p in found["paired"]:
        if not p["questions"]:
            lines.append(f"  {p['a']} - {p['b']} {p['curve']}: no question has both")
            continue
        verdict = p["warning"] or ("the interval excludes 0" if p["excludes_zero"] else "the interval includes 0")
        lines.append(f"  {p['a']} - {p['b']} {p['curve']}: {p['difference']:+.3f} "
                     f"{_interval(p['ci95_low'], p['ci95_high'])} over {p['questions']} questions "
                     f"({p['trajectories_a']} / {p['trajectories_b']} trajectories): {verdict}")
    return "\n".join(lines)
