"""Pure summaries of an inner-loop loss curve (see learners/probe.py): plain Python, no torch.

The x axis of the slope and the area is the prefix fraction i / L (0 = nothing read, 1 = the whole
trajectory), so trajectories of different lengths compare on one scale: the slope is the change of the
answer NLL (nats) over the whole trajectory by a least-squares line, and the area is the curve's mean
height (nats) over [0, 1] by the trapezoid rule.

Attribution (the paper's reflection words): the relative change of the curve at token i is
(c[i+1] - c[i]) / c[i], the effect of reading token i. Tokens that begin a configured word ("Wait",
"Alternatively", ...) are compared with all other tokens. With every > 1 the curve has one point per
`every` tokens; an interval between two points counts as a word's when one of its tokens begins it.
"""

from __future__ import annotations

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
    count: int
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
    any_word: TokenGroupChange  # tokens that begin any configured word
    other: TokenGroupChange  # every other token

    def to_dict(self) -> dict:
        return {"per_word": {g.label: g.to_dict() for g in self.per_word}, "any_word": self.any_word.to_dict(),
                "other": self.other.to_dict()}


def summarize_curve(positions: Sequence[int], values: Sequence[float], completion_length: int) -> CurveSummary:
    _check_curve(positions, values)
    if completion_length == 0:  # an empty trajectory: one point, nothing moves
        return CurveSummary(values[0], values[0], 0.0, values[0])
    x = [p / completion_length for p in positions]
    return CurveSummary(start=values[0], end=values[-1], slope=_least_squares_slope(x, values),
                        area=_mean_height(x, values))


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


def word_starts(token_texts: Sequence[str], words: Sequence[str] = DEFAULT_WORDS) -> tuple[str | None, ...]:
    """Per token, the configured word it begins (after its own leading whitespace), else None.

    A match must stand as a whole word: "But" begins "But," and " But" but not "Butter" or "rebut".
    """
    text = "".join(token_texts)
    starts, offset = [], 0
    for token in token_texts:
        begin = offset + len(token) - len(token.lstrip())
        offset += len(token)
        starts.append(_word_at(text, begin, words) if begin < offset else None)
    return tuple(starts)


def _word_at(text: str, begin: int, words: Sequence[str]) -> str | None:
    if begin > 0 and text[begin - 1].isalnum():
        return None
    for word in words:
        after = begin + len(word)
        if text.startswith(word, begin) and (after == len(text) or not text[after].isalnum()):
            return word
    return None


def attribute(positions: Sequence[int], values: Sequence[float], token_words: Sequence[str | None],
              words: Sequence[str] = DEFAULT_WORDS) -> Attribution:
    """Relative curve changes at word-starting tokens (per word, and pooled) vs all other tokens.

    token_words: `word_starts` of the completion's tokens. A step from a curve value of 0 has no
    relative change and is left out.
    """
    _check_curve(positions, values)
    per_word = {w: TokenGroupChange(w, 0, 0.0) for w in words}
    other = TokenGroupChange("other", 0, 0.0)
    for k in range(len(positions) - 1):
        if values[k] == 0:
            continue
        change = TokenGroupChange("", 1, (values[k + 1] - values[k]) / values[k])
        word = next((w for w in token_words[positions[k] : positions[k + 1]] if w in per_word), None)
        if word is None:
            other = other.plus(change)
        else:
            per_word[word] = per_word[word].plus(change)
    any_word = TokenGroupChange("any_word", sum(g.count for g in per_word.values()),
                                sum(g.total for g in per_word.values()))
    return Attribution(tuple(per_word.values()), any_word, other)


def _check_curve(positions: Sequence[int], values: Sequence[float]) -> None:
    if not values or len(positions) != len(values):
        raise ValueError(f"a curve needs one value per position and at least one point; got {len(positions)} "
                         f"positions and {len(values)} values")
