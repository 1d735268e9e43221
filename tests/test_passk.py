"""Avg@n, Pass@k, G-Pass@k and mG-Pass@k against closed forms, hand values and brute force."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from innerloop.distributed.lens.passk import (KScores, avg_at_n, g_pass_at_k, mg_pass_at_k, pass_at_k,
                                         summarize)

SMALL = [(n, c, k) for n in range(1, 9) for c in range(n + 1) for k in range(1, n + 1)]


def brute_force(n: int, c: int, k: int, at_least: int) -> Fraction:
    """The share of all k-subsets of a 0/1 vector (c ones of n) holding at least `at_least` ones."""
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(sum(outcomes[i] for i in subset) >= at_least for subset in subsets)
    return Fraction(hits, len(subsets))


# ---------------------------------------------------------------- Pass@k


@pytest.mark.parametrize("n, c", [(1, 0), (1, 1), (4, 1), (5, 3), (16, 7)])
def test_pass_at_1_is_the_share_correct(n, c):
    assert pass_at_k(n, c, 1) == c / n


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 2, 2) == 5 / 6  # 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert pass_at_k(5, 1, 3) == 3 / 5  # 1 - C(4,3)/C(5,3) = 1 - 4/10
    assert pass_at_k(6, 2, 3) == 4 / 5  # 1 - C(4,3)/C(6,3) = 1 - 4/20


@pytest.mark.parametrize("n, c, k", [(4, 2, 3), (4, 1, 4), (8, 5, 4), (3, 3, 1)])
def test_pass_at_k_is_one_when_fewer_wrong_than_k(n, c, k):
    assert n - c < k
    assert pass_at_k(n, c, k) == 1.0


@pytest.mark.parametrize("n, k", [(1, 1), (4, 2), (8, 8)])
def test_pass_at_k_is_zero_without_a_correct_sample(n, k):
    assert pass_at_k(n, 0, k) == 0.0


def test_pass_at_k_matches_brute_force():
    for n, c, k in SMALL:
        assert pass_at_k(n, c, k) == float(brute_force(n, c, k, at_least=1)), (n, c, k)


def test_pass_at_k_grows_with_k_and_with_c():
    n = 10
    for c in range(n + 1):
        by_k = [pass_at_k(n, c, k) for k in range(1, n + 1)]
        assert by_k == sorted(by_k)
    for k in range(1, n + 1):
        by_c = [pass_at_k(n, c, k) for c in range(n + 1)]
        assert by_c == sorted(by_c)


def test_pass_at_k_is_exact_for_large_n():
    # 1 - C(n-1, k)/C(n, k) = k/n exactly; the binomials here have hundreds of digits.
    assert pass_at_k(1000, 1, 100) == 0.1
    assert pass_at_k(2000, 1, 1000) == 0.5


# ---------------------------------------------------------------- G-Pass@k


def test_g_pass_at_tau_one_is_all_k_correct():
    for n, c, k in SMALL:
        assert g_pass_at_k(n, c, k, 1.0) == math.comb(c, k) / math.comb(n, k), (n, c, k)


@pytest.mark.parametrize("tau", [0.25, 0.5, 0.6, 0.75, 0.9, 1.0])
def test_g_pass_matches_brute_force(tau):
    for n, c, k in SMALL:
        need = math.ceil(Fraction(str(tau)) * k)
        assert g_pass_at_k(n, c, k, tau) == float(brute_force(n, c, k, at_least=need)), (n, c, k)


def test_g_pass_at_the_lowest_tau_is_pass_at_k():
    for n, c, k in SMALL:
        assert g_pass_at_k(n, c, k, Fraction(1, k)) == pass_at_k(n, c, k), (n, c, k)


def test_g_pass_threshold_is_read_from_the_decimal_tau():
    # The float 0.9 is just above 9/10; read naively, 0.9 * 10 would ask for all 10 correct.
    assert g_pass_at_k(10, 9, 10, 0.9) == 1.0  # 9 of 10 correct: always at least 9 drawn
    assert g_pass_at_k(10, 9, 10, 1.0) == 0.0


def test_g_pass_falls_as_tau_rises():
    values = [g_pass_at_k(8, 5, 4, tau) for tau in (0.25, 0.5, 0.75, 1.0)]
    assert values == sorted(values, reverse=True)
    assert values[0] > values[-1]


@pytest.mark.parametrize("tau", [0, -0.5, 1.01])
def test_g_pass_rejects_tau_outside_zero_one(tau):
    with pytest.raises(ValueError, match=r"tau in \(0, 1\]"):
        g_pass_at_k(4, 2, 2, tau)


# ---------------------------------------------------------------- mG-Pass@k


def test_mg_pass_hand_values():
    # k=2: (2/2) * P(2 of 2 correct) = C(c,2)/C(n,2).
    assert mg_pass_at_k(4, 2, 2) == 1 / 6
    # k=4, n=5, c=3: i in {3, 4}; P(>=3 of 4) = (C(3,3)C(2,1)) / C(5,4) = 2/5, P(4 of 4) = 0.
    assert mg_pass_at_k(5, 3, 4) == pytest.approx((2 / 4) * (2 / 5), abs=0)
    # k=4, n=6, c=4: P(>=3) = (C(4,3)C(2,1) + C(4,4)) / C(6,4) = 9/15, P(4) = 1/15 -> (1/2)(10/15).
    assert mg_pass_at_k(6, 4, 4) == 1 / 3
    # k=3, n=4, c=3: only i=3; P(3 of 3) = C(3,3)/C(4,3) = 1/4 -> (2/3)(1/4).
    assert mg_pass_at_k(4, 3, 3) == 1 / 6


def test_mg_pass_matches_brute_force():
    for n, c, k in SMALL:
        tail = sum((brute_force(n, c, k, at_least=i) for i in range(math.ceil(k / 2) + 1, k + 1)), Fraction(0))
        assert mg_pass_at_k(n, c, k) == float(Fraction(2, k) * tail), (n, c, k)


@pytest.mark.parametrize("k", [2, 4, 6, 8])
def test_mg_pass_of_an_always_right_model_is_one_for_even_k(k):
    assert mg_pass_at_k(8, 8, k) == 1.0


@pytest.mark.parametrize("k, ceiling", [(1, 0.0), (3, 2 / 3), (5, 4 / 5)])
def test_mg_pass_for_odd_k_tops_out_below_one_as_published(k, ceiling):
    assert mg_pass_at_k(8, 8, k) == ceiling


def test_mg_pass_is_at_most_pass_at_k_and_grows_with_c():
    for n, c, k in SMALL:
        assert mg_pass_at_k(n, c, k) <= pass_at_k(n, c, k)
    by_c = [mg_pass_at_k(8, c, 4) for c in range(9)]
    assert by_c == sorted(by_c) and by_c[0] == 0.0


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("metric", [pass_at_k, mg_pass_at_k, lambda n, c, k: g_pass_at_k(n, c, k, 0.5)])
def test_k_above_n_is_refused_in_the_users_terms(metric):
    with pytest.raises(ValueError, match=r"n=4 samples .* got k=5.*eval\.samples"):
        metric(4, 2, 5)


@pytest.mark.parametrize("n, c, k, words", [(4, 2, 0, "got k=0"), (0, 0, 1, "got n=0"),
                                            (4, 5, 1, "got c=5"), (4, -1, 1, "got c=-1")])
def test_impossible_counts_are_refused(n, c, k, words):
    with pytest.raises(ValueError, match=words):
        pass_at_k(n, c, k)


# ---------------------------------------------------------------- Avg@n and the summary


def test_avg_at_n_weighs_every_question_the_same():
    assert avg_at_n([(4, 1), (2, 2)]) == (1 / 4 + 1) / 2
    with pytest.raises(ValueError, match="at least one question"):
        avg_at_n([])


def test_summary_averages_each_metric_over_questions():
    counts = [(4, 2), (4, 0), (4, 4)]
    summary = summarize(counts, [1, 2])
    assert summary.questions == 3 and summary.samples == 4
    assert summary.avg_at_n == 0.5
    assert summary.by_k == (KScores(1, 0.5, 0.0),
                            KScores(2, pytest.approx((5 / 6 + 0 + 1) / 3), pytest.approx((1 / 6 + 0 + 1) / 3)))
    assert summary.to_dict() == {"questions": 3, "samples": 4, "avg_at_n": 0.5,
                                 "pass@1": 0.5, "pass@2": summary.by_k[1].pass_at_k,
                                 "mg_pass@1": 0.0, "mg_pass@2": summary.by_k[1].mg_pass_at_k}


def test_summary_refuses_nothing_to_report():
    with pytest.raises(ValueError, match="no questions"):
        summarize([], [1])
    with pytest.raises(ValueError, match="eval.pass_k"):
        summarize([(4, 2)], [])
