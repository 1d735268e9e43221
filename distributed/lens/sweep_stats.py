"""The statistics of `innerloop sweep`, as pure functions (stdlib only, so they test in milliseconds).

- `mean_ci`: the mean over seeds with a two-sided 95% Student-t interval, mean +- t(0.975, n-1) s/sqrt(n)
  (s the sample standard deviation); one seed gives no interval.
- `mcnemar_exact`: McNemar's exact test on the discordant pairs of two paired 0/1 outcomes: under the
  null each discordant pair goes either way with probability 1/2, so p = 2 P(Binomial(b+c, 1/2) <= min(b, c)),
  capped at 1.
- `paired_bootstrap`: the difference of two accuracies measured on the same units (held-out questions),
  resampled over the units: its mean, a 95% percentile interval, and the two-sided p-value of that
  percentile bootstrap, 2 x the smaller share of resampled differences on either side of 0 (with the
  usual +1 in numerator and denominator, so p is never 0).

The t quantile needs no scipy: for an integer number of degrees of freedom Student's t has a closed-form
CDF (a finite series in theta = atan(t / sqrt(df)), Abramowitz & Stegun 26.7.3-4), inverted by bisection.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence


def t_two_sided_probability(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with `df` (>= 1, integer) degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:  # 2/pi (theta + sin cos [1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3)])
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + s * math.cos(theta) * total)
    term, total = 1.0, 1.0  # sin [1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2)]
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def t_quantile(level: float, df: int) -> float:
    """The t with P(|T| <= t) = level (e.g. 0.95 gives t(0.975, df)): bisection on the exact CDF."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    low, high = 0.0, 1.0
    while t_two_sided_probability(high, df) < level:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if t_two_sided_probability(mid, df) < level:
            low = mid
        else:
            high = mid
        if high - low < 1e-12:
            break
    return (low + high) / 2


@dataclass(frozen=True)
class MeanCI:
    n: int
    mean: float
    half_width: float | None  # None: fewer than 2 values

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    def to_dict(self) -> dict:
        return {"n": self.n, "mean": self.mean, "ci95_half_width": self.half_width, "ci95_low": self.low,
                "ci95_high": self.high}


def mean_ci(values: Sequence[float], level: float = 0.95) -> MeanCI | None:
    """Mean and t-interval half-width of `values` (the seeds of one cell); None for no values."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return None
    mean = sum(values) / n
    if n == 1:
        return MeanCI(1, mean, None)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return MeanCI(n, mean, t_quantile(level, n - 1) * sd / math.sqrt(n))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for `b` pairs right only under A and `c` right only under B."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b} and {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class BootstrapResult:
    difference: float  # mean of A - B over the units
    low: float  # 95% percentile interval of the difference
    high: float
    p_value: float
    resamples: int

    def to_dict(self) -> dict:
        return {"difference": self.difference, "ci95_low": self.low, "ci95_high": self.high,
                "p_value": self.p_value, "resamples": self.resamples}


def paired_bootstrap(differences: Sequence[float], resamples: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> BootstrapResult:
    """Resample the units' differences (A - B per question, averaged over the seeds both cells ran)
    with replacement; each resample's mean is one bootstrap difference of the two accuracies."""
    if not differences:
        raise ValueError("a paired bootstrap needs at least one unit")
    units = [float(d) for d in differences]
    n, rng = len(units), random.Random(seed)
    means = sorted(sum(rng.choices(units, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    low = means[min(resamples - 1, int(math.floor(tail * resamples)))]
    high = means[min(resamples - 1, int(math.ceil((1 - tail) * resamples)) - 1)]
    at_or_below = sum(1 for m in means if m <= 0)
    at_or_above = sum(1 for m in means if m >= 0)
    p = min(1.0, 2 * (min(at_or_below, at_or_above) + 1) / (resamples + 1))
    return BootstrapResult(sum(units) / n, low, high, p, resamples)


@dataclass(frozen=True)
class PairedCounts:
    """Pairs of 0/1 outcomes of cells A and B on the same (seed, question)."""

    both: int
    a_only: int  # right under A, wrong under B (McNemar's b)
    b_only: int  # (McNemar's c)
    neither: int

    @property
    def pairs(self) -> int:
        return self.both + self.a_only + self.b_only + self.neither


def paired_counts(pairs: Sequence[tuple[bool, bool]]) -> PairedCounts:
    both = sum(1 for a, b in pairs if a and b)
    a_only = sum(1 for a, b in pairs if a and not b)
    b_only = sum(1 for a, b in pairs if b and not a)
    return PairedCounts(both, a_only, b_only, len(pairs) - both - a_only - b_only)
