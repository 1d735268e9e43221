"""Sampling metrics over n completions per question, c of them correct: Avg@n, Pass@k, G-Pass@k, mG-Pass@k.

Pure arithmetic, no engine: `innerloop eval` counts (n, c) per held-out question and calls `summarize`.
Every estimator is computed exactly with integers and fractions (math.comb is exact), so there is no
cancellation in 1 - C(n-c, k)/C(n, k) however close the ratio is to 1; only the result becomes a float.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Sequence


@dataclass(frozen=True)
class KScores:
    """The scores at one k, each averaged over questions."""

    k: int
    pass_at_k: float
    mg_pass_at_k: float


@dataclass(frozen=True)
class PassKSummary:
    """Avg@n and, for each configured k, Pass@k and mG-Pass@k, averaged over questions."""

    questions: int
    samples: int  # the largest n of any question (all questions have the same n in `innerloop eval`)
    avg_at_n: float
    by_k: tuple[KScores, ...]

    def to_dict(self) -> dict:
        return {"questions": self.questions, "samples": self.samples, "avg_at_n": self.avg_at_n,
                **{f"pass@{s.k}": s.pass_at_k for s in self.by_k},
                **{f"mg_pass@{s.k}": s.mg_pass_at_k for s in self.by_k}}


def avg_at_n(counts: Iterable[tuple[int, int]]) -> float:
    """Mean over questions of c/n: the expected accuracy of one sample (each question weighs the same)."""
    counts = list(counts)
    if not counts:
        raise ValueError("Avg@n needs at least one question")
    for n, c in counts:
        _check_counts(n, c)
    return float(sum(Fraction(c, n) for n, c in counts) / len(counts))


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased Pass@k estimator of Chen et al. (2021): 1 - C(n-c, k) / C(n, k).

    The chance that k of the n samples, drawn without replacement, include at least one correct one.
    """
    _check(n, c, k)
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def g_pass_at_k(n: int, c: int, k: int, tau: float | Fraction) -> float:
    """G-Pass@k_tau (Liu et al. 2024): the chance that at least ceil(tau * k) of k samples drawn
    without replacement from the n are correct, sum_{j=ceil(tau k)}^{c} C(c,j) C(n-c,k-j) / C(n,k).

    tau is in (0, 1]; tau = 1 asks all k to be correct, and any tau <= 1/k gives Pass@k.
    """
    _check(n, c, k)
    threshold = _as_fraction(tau)
    if not 0 < threshold <= 1:
        raise ValueError(f"G-Pass@k needs tau in (0, 1], got tau={tau}")
    return float(_at_least(n, c, k, math.ceil(threshold * k)))


def mg_pass_at_k(n: int, c: int, k: int) -> float:
    """mG-Pass@k as defined and computed by Liu et al. (2024), "Are Your LLMs Capable of Stable
    Reasoning?" (arXiv 2412.13147): (2/k) * sum_{i=ceil(k/2)+1}^{k} G-Pass@k_{i/k}.

    It stands for 2 * integral of G-Pass@k_tau over tau in (0.5, 1], the mean G-Pass over the
    strict-majority thresholds; for even k the sum is that integral exactly. For odd k it leaves out
    the half step at tau just above 0.5, so even a model that is always right scores 2*floor(k/2)/k
    there (k=3: 2/3), and mG-Pass@1 is 0 for every model (the sum is empty). Kept as published so the
    numbers compare with the paper's; prefer even k.
    """
    _check(n, c, k)
    total = sum((_at_least(n, c, k, i) for i in range(math.ceil(k / 2) + 1, k + 1)), Fraction(0))
    return float(Fraction(2, k) * total)


def summarize(counts: Sequence[tuple[int, int]], ks: Sequence[int]) -> PassKSummary:
    """Avg@n, and Pass@k and mG-Pass@k at each k in `ks`, over per-question (n, c) pairs."""
    if not counts:
        raise ValueError("nothing to summarize: no questions were evaluated")
    if not ks:
        raise ValueError("no k to report: give at least one k (eval.pass_k)")
    by_k = tuple(KScores(k, statistics.fmean(pass_at_k(n, c, k) for n, c in counts),
                         statistics.fmean(mg_pass_at_k(n, c, k) for n, c in counts)) for k in ks)
    return PassKSummary(len(counts), max(n for n, _ in counts), avg_at_n(counts), by_k)


def _at_least(n: int, c: int, k: int, m: int) -> Fraction:
    """P(at least m correct among k drawn without replacement): the hypergeometric upper tail."""
    favourable = sum(math.comb(c, j) * math.comb(n - c, k - j) for j in range(max(m, 0), min(c, k) + 1))
    return Fraction(favourable, math.comb(n, k))


def _as_fraction(tau: float | Fraction) -> Fraction:
    # From the decimal text: the float 0.9 lies just above 9/10, and ceil(0.9 * 10) would then be 10.
    return tau if isinstance(tau, Fraction) else Fraction(repr(float(tau)))


def _check_counts(n: int, c: int) -> None:
    if n < 1:
        raise ValueError(f"a question needs at least one sample, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"the correct count must be between 0 and the n={n} samples, got c={c}")


def _check(n: int, c: int, k: int) -> None:
    _check_counts(n, c)
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the n={n} samples drawn per question, got k={k}; "
                         f"draw at least k samples per question (eval.samples) or lower k (eval.pass_k)")
