import math

import numpy as np
import pytest
import torch

from smpo.losses import smpo_loss
from smpo.preference import score_range, sensitivity_ratio, win_probability


def test_win_probability_by_hand():
    # s~_w = (0.25 - 0.1) / 0.2 = 0.75, s~_l = (0.15 - 0.1) / 0.2 = 0.25
    p = win_probability(0.25, 0.15, score_min=0.1, score_max=0.3)
    expected = math.exp(0.75) / (math.exp(0.75) + math.exp(0.25))
    assert p.item() == pytest.approx(expected, rel=1e-12)


def test_win_probability_range_and_symmetry():
    scores = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    p = win_probability(scores[2], scores[0], score_min=0.0, score_max=1.0)
    assert p.item() == pytest.approx(1 / (1 + math.exp(-1)))  # the largest possible, sigmoid(1)
    assert win_probability(0.3, 0.3, score_min=0.0, score_max=1.0).item() == 0.5
    a = win_probability(scores, scores.flip(0), score_min=0.0, score_max=1.0)
    assert torch.allclose(a + a.flip(0), torch.ones(3, dtype=torch.float64))


def test_win_probability_is_invariant_to_rescaling_scores():
    # PickScore's logit-scaled score is 100 x cosine: normalising either gives the same p_w
    a = win_probability(0.25, 0.15, score_min=0.1, score_max=0.3)
    b = win_probability(25.0, 15.0, score_min=10.0, score_max=30.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_win_probability_rejects_an_empty_range():
    with pytest.raises(ValueError, match="score_min"):
        win_probability(0.2, 0.1, score_min=0.3, score_max=0.3)


def test_sensitivity_ratio():
    assert sensitivity_ratio(0.7, 10.0).item() == pytest.approx(4.0)
    assert sensitivity_ratio(torch.tensor([0.5, 1.0]), 2.0).tolist() == [0.0, 2.0]


def test_score_range_over_chunks():
    chunks = [torch.tensor([0.2, 0.5]), np.array([0.1]), [0.4, 0.45]]
    assert score_range(chunks) == (pytest.approx(0.1), pytest.approx(0.5))
    assert score_range(torch.tensor([[3.0, 1.0], [2.0, 5.0]])) == (1.0, 5.0)
    with pytest.raises(ValueError, match="empty"):
        score_range([])
    with pytest.raises(ValueError, match="equal"):
        score_range([torch.tensor([1.0, 1.0])])
    with pytest.raises(ValueError, match="NaN"):
        score_range([torch.tensor([1.0, float("nan")])])


def test_smoothed_labels_feed_the_loss():
    scores_w, scores_l = torch.tensor([0.28, 0.2]), torch.tensor([0.12, 0.2])
    lo, hi = score_range([scores_w, scores_l])
    p = win_probability(scores_w, scores_l, score_min=lo, score_max=hi)
    out = smpo_loss(torch.tensor([0.1, 0.1]), torch.tensor([0.2, 0.2]), torch.tensor([0.2, 0.2]),
                    torch.tensor([0.1, 0.1]), p_win=p, beta=10.0, gamma=10.0)
    lam0 = 10 * (2 * (1 / (1 + math.exp(-1))) - 1)
    assert out.losses[0].item() == pytest.approx(-math.log(1 / (1 + math.exp(-(5.0 * lam0 * 0.2)))), rel=1e-5)
    assert out.losses[1].item() == pytest.approx(math.log(2))
