"""Pure summaries of an inner-loop loss curve (see learners/probe.py): plain Python, no torch.

The x axis of the slope and the area is the prefix fraction i / L (0 = nothing read, 1 = the whole
trajectory), so trajectories of different lengths compare on one scale: the slope is the change of the
answer NLL (nats) over the whole trajectory by a least-squares line, and the area is the curve's mean
height (nats) over [0, 1] by the trapezoid rule.

The cut curve: a correct trajectory usually writes the reference answer before its end, and after that
point a falling curve may be mere copying. `answer_position` finds the token where the answer first
appears (as a whole number: "42" in "142" does not count); the cut summary uses only the prefixes
that end before it, on the same x axis (so its slope is in the same nats per whole trajectory).

Attribution, as the paper defines it: the relative change of the curve at token i is
|c[i+1] - c[i]| / c[i], the size of the effect of reading token i. A configured word ("Wait",
"Hold on", ...) may span several tokens; one occurrence's value is the mean over its tokens, a word's
the mean over its occurrences, and the baseline the mean over all tokens (the word's own included).
With every > 1 the curve has one point per `every` tokens: a token takes the change of the curve step
it lies in, and an occurrence the mean over the steps its tokens lie in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

DEFAULT_WORDS = ("Wait", "Alternatively", "Hold on", "But")


@dataclass(frozen=True)
class CurveSummary:
    start: float  # NLL after the prompt alone (prefix 0)
    end: float  # NLL after the whole trajectory
    slope: float  # least-squares slope of NLL over the prefix fraction: nats per whole trajectory
    area: float  # mean height of the curve over the prefix fraction [0, 1] (trapezoid), nats

    def to_dict(self) -> dict[str, float]:
        return {"start": self.start, "end": self.end, "slope": self.slope, "area": self.area}


@dataclass(frozen=True)
class TokenGroupChange:
    """Relative curve changes at one group of tokens, as a count and a sum so groups pool exactly."""

    label: str
    count: int  # occurrences of a word; curve steps for all tokens
    total: float  # sum of the relative changes

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def plus(self, other: TokenGroupChange) -> TokenGroupChange:
        return TokenGroupChange(self.label, self.count + other.count, self.total + other.total)

    def to_dict(self) -> dict:
        return {"count": self.count, "mean_relative_change": self.mean}


@dataclass(frozen=True)
class Attribution:
    per_word: tuple[TokenGroupChange, ...]  # one per configured word, in the configured order
    any_word: TokenGroupChange  # occurrences of any configured word
    all_tokens: TokenGroupChange  # every token (every curve step): the paper's baseline

    def to_dict(self) -> dict:
        return {"per_word": {g.label: g.to_dict() for g in self.per_word}, "any_word": self.any_word.to_dict(),
                "all_tokens": self.all_tokens.to_dict()}


def summarize_curve(positions: Sequence[int], values: Sequence[float], completion_length: int) -> CurveSummary:
    _check_curve(positions, values)
    if completion_length == 0:  # an empty trajectory: one point, nothing moves
        return CurveSummary(values[0], values[0], 0.0, values[0])
    x = [p / completion_length for p in positions]
    return CurveSummary(start=values[0], end=values[-1], slope=_least_squares_slope(x, values),
                        area=_mean_height(x, values))


def summarize_cut(positions: Sequence[int], values: Sequence[float], completion_length: int,
                  cut: int | None) -> CurveSummary | None:
    """The summary of the curve's prefixes of at most `cut` tokens (None: the answer never appears,
    the whole curve); None when fewer than two points lie before the cut (no slope to take)."""
    _check_curve(positions, values)
    kept = [(p, v) for p, v in zip(positions, values) if cut is None or p <= cut]
    if len(kept) < 2 or completion_length == 0:
        return None
    x = [p / completion_length for p, _ in kept]
    y = [v for _, v in kept]
    return CurveSummary(start=y[0], end=y[-1], slope=_least_squares_slope(x, y), area=_mean_height(x, y))


def _least_squares_slope(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 2:
        return 0.0
    mean_x, mean_y = sum(x) / len(x), sum(y) / len(y)
    spread = sum((a - mean_x) ** 2 for a in x)
    return sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y)) / spread


def _mean_height(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 2 or x[-1] == x[0]:
        return y[0]
    trapezoids = sum((x[k + 1] - x[k]) * (y[k + 1] + y[k]) / 2 for k in range(len(x) - 1))
    return trapezoids / (x[-1] - x[0])


def _token_at(token_texts: Sequence[str], char: int) -> int:
    """The index of the token holding character `char` of the joined text."""
    offset = 0
    for index, token in enumerate(token_texts):
        offset += len(token)
        if char < offset:
            return index
    return len(token_texts)


def answer_position(token_texts: Sequence[str], answer: str) -> int | None:
    """The index of the token where `answer` first appears in the joined token texts, standing alone
    (no digit, letter or decimal point right before it, no digit or letter right after: "42" is not
    found in "142" or "4.2" or "420"); None when it never does."""
    answer = answer.strip()
    if not answer:
        return None
    pattern = re.compile(r"(?<![\w.])" + re.escape(answer) + r"(?![\w]|\.\d)")
    found = pattern.search("".join(token_texts))
    return None if found is None else _token_at(token_texts, found.start())


def word_spans(token_texts: Sequence[str], words: Sequence[str] = DEFAULT_WORDS) -> tuple[tuple[str, int, int], ...]:
    """Each whole-word occurrence of a configured word as (word, first token, end token), tokens
    [first, end) being those that hold its characters: "Hold on" over " Hold", " on" is one
    occurrence of two tokens, "W", "ait" one of "Wait". "But" matches "But," not "Butter" or "rebut";
    where two words start at one place the longer wins."""
    text = "".join(token_texts)
    spans = []
    for word in sorted(words, key=len, reverse=True):
        for found in re.finditer(r"(?<![^\W_])" + re.escape(word) + r"(?![^\W_])", text):
            first, last = _token_at(token_texts, found.start()), _token_at(token_texts, found.end() - 1)
            if not any(first < end and begin <= last for _, begin, end in spans):
                spans.append((word, first, last + 1))
    return tuple(sorted(spans, key=lambda span: span[1]))


def attribute(positions: Sequence[int], values: Sequence[float], spans: Sequence[tuple[str, int, int]],
              words: Sequence[str] = DEFAULT_WORDS) -> Attribution:
    """|delta| / previous at each configured word's occurrences (per word, and pooled) against the mean
    over all tokens. spans: `word_spans` of the completion's tokens. A step from a curve value of 0
    has no relative change and is left out, of the baseline and of any occurrence."""
    _check_curve(positions, values)
    changes = [None if values[k] == 0 else abs(values[k + 1] - values[k]) / values[k] for k in range(len(values) - 1)]
    known = [c for c in changes if c is not None]
    per_word = {w: TokenGroupChange(w, 0, 0.0) for w in words}
    for word, first, end in spans:
        steps = {k for k in range(len(changes)) if positions[k] < end and first < positions[k + 1]}
        found = [changes[k] for k in sorted(steps) if changes[k] is not None]
        if word in per_word and found:
            per_word[word] = per_word[word].plus(TokenGroupChange(word, 1, sum(found) / len(found)))
    any_word = TokenGroupChange("any_word", sum(g.count for g in per_word.values()),
                                sum(g.total for g in per_word.values()))
    return Attribution(tuple(per_word.values()), any_word, TokenGroupChange("all_tokens", len(known), sum(known)))


def _check_curve(positions: Sequence[int], values: Sequence[float]) -> None:
    if not values or len(positions) != len(values):
        raise ValueError(f"a curve needs one value per position and at least one point; got {len(positions)} "
                         f"positions and {len(values)} values")
