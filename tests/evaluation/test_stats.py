import math

import numpy as np
import pandas as pd
import pytest

from smpo.evaluation import stats
from smpo.evaluation.evaluate import summarize


def test_median_and_mean_of_a_hand_made_table():
    scores = [1.0, 3.0, 2.0, 10.0]
    assert stats.median(scores) == 2.5  # (2 + 3) / 2
    assert stats.mean(scores) == 4.0  # 16 / 4
    assert stats.median([5.0, 1.0, 3.0]) == 3.0


def test_win_rate_counts_ties_one_half():
    a = [1.0, 2.0, 3.0, 4.0]
    b = [0.0, 2.0, 5.0, 1.0]
    # win, tie, loss, win -> (2 + 0.5) / 4
    assert stats.win_outcomes(a, b).tolist() == [1.0, 0.5, 0.0, 1.0]
    assert stats.win_rate(a, b) == 0.625
    assert stats.win_rate(b, a) == 0.375  # the two directions sum to one
    with pytest.raises(ValueError, match="paired scores; got 2 and 3"):
        stats.win_rate([1, 2], [1, 2, 3])


def test_bootstrap_of_a_constant_is_that_constant():
    assert stats.bootstrap_interval([7.0] * 5, "median") == (7.0, 7.0)


def test_bootstrap_of_two_values_spans_both():
    # Resampled means of {0, 1} (n = 2) are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4:
    # the 2.5% and 97.5% quantiles of 1000 draws are 0 and 1.
    assert stats.bootstrap_interval([0.0, 1.0], "mean", num_resamples=1000) == (0.0, 1.0)


def test_bootstrap_interval_matches_the_normal_approximation():
    # 100 Bernoulli outcomes, half ones: mean 0.5, standard error sqrt(0.25 / 100) = 0.05,
    # so the 95% interval is about 0.5 +- 1.96 * 0.05 = [0.402, 0.598].
    values = np.array([0.0, 1.0] * 50)
    low, high = stats.bootstrap_interval(values, "mean", num_resamples=4000, seed=1)
    assert low == pytest.approx(0.402, abs=0.015)
    assert high == pytest.approx(0.598, abs=0.015)


def test_bootstrap_resamples_prompts_not_images():
    # 50 prompts with 2 identical images each: only 50 independent outcomes, so the standard
    # error is sqrt(0.25 / 50) = 0.0707 and the interval 0.5 +- 0.139, wider than for 100 values.
    per_prompt = np.array([0.0, 1.0] * 25)
    values = np.repeat(per_prompt, 2)
    groups = np.repeat(np.arange(50), 2)
    low, high = stats.bootstrap_interval(values, "mean", groups=groups, num_resamples=4000, seed=1)
    assert low == pytest.approx(0.5 - 1.96 * math.sqrt(0.25 / 50), abs=0.02)
    assert high == pytest.approx(0.5 + 1.96 * math.sqrt(0.25 / 50), abs=0.02)


def test_bootstrap_with_unequal_groups_keeps_groups_together():
    # Group 0 holds {0, 0, 0}, group 1 holds {1}: a resample of 2 groups has mean 0, 1/4, 1/4 or 1
    # (0+0, 0+1 twice, 1+1) -> quantiles 0 and 1, and the median of every resample is 0, 0, 0 or 1.
    values = [0.0, 0.0, 0.0, 1.0]
    groups = ["a", "a", "a", "b"]
    assert stats.bootstrap_interval(values, "mean", groups=groups) == (0.0, 1.0)
    draws = stats._resample_statistics(np.array(values), stats._group_members(4, groups), np.mean,
                                       np.random.default_rng(0), 200)
    assert set(np.round(draws, 6)) <= {0.0, 0.25, 1.0}


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(ValueError, match="confidence"):
        stats.bootstrap_interval([1.0], confidence=1.5)
    with pytest.raises(ValueError, match="empty"):
        stats.bootstrap_interval([])
    with pytest.raises(ValueError, match="NaN"):
        stats.median([1.0, float("nan")])


def test_summary_table_of_hand_made_scores():
    table = pd.DataFrame({"prompt_index": [0, 1, 2, 3], "image_index": [0] * 4,
                          "pickscore": [20.0, 22.0, 21.0, 30.0], "aesthetic": [5.0, 5.0, 5.0, 5.0]})
    summary = summarize(table, ["pickscore", "aesthetic"], num_resamples=200).set_index("scorer")
    assert summary.loc["pickscore", "median"] == 21.5
    assert summary.loc["pickscore", "mean"] == 23.25
    assert summary.loc["pickscore", "n"] == 4
    assert 20.0 <= summary.loc["pickscore", "median_low"] <= 21.5 <= summary.loc["pickscore", "median_high"] <= 30.0
    assert tuple(summary.loc["aesthetic", ["median_low", "median_high", "mean_low", "mean_high"]]) == (5.0,) * 4


def test_t_interval_of_seeds_matches_the_textbook_formula():
    from smpo.evaluation.stats import t_interval

    # mean 3, sample std sqrt(2.5), n 5: half-width t_{0.975,4} * sqrt(2.5 / 5) = 2.776 * 0.70711
    m, low, high = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert m == 3.0 and high - m == pytest.approx(2.776 * 0.7071068, rel=1e-6) and m - low == pytest.approx(high - m)
    m, low, high = t_interval([0.1, 0.3])  # df 1: t = 12.706, std 0.14142, n 2
    assert (low, high) == pytest.approx((0.2 - 12.706 * 0.1, 0.2 + 12.706 * 0.1))
    m, low, high = t_interval([0.5])
    assert m == 0.5 and np.isnan(low) and np.isnan(high)


def test_interval_and_win_rate_cells_are_written_one_way():
    assert stats.format_interval((0.01234, -0.0052, 0.0299), 3, sign=True) == "+0.012 [-0.005, +0.030]"
    assert stats.format_interval((0.5, 0.41, 0.589), 2) == "0.50 [0.41, 0.59]"
    assert stats.format_interval((0.25, math.nan, math.nan), 2) == "0.25"  # one seed: no interval
    assert stats.win_rate_cell(52.25, 48.0, 56.04) == "52.2 [48.0, 56.0]"
    assert stats.win_rate_cell(math.nan, math.nan, math.nan) == "-"
