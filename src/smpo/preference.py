"""Smoothed preference (SmPO Sec. 4.1, Eq. 11-12; ALGORITHM.md section 2).

A reward model scores every image of the training set. Scores are min-max normalised over the
whole scored set S (Eq. 11), and the probability that the higher-scored image wins is the
Bradley-Terry / softmax probability of the normalised scores. It lies in [0.5, sigmoid(1)].
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

# Raw PickScore cosine similarities on Pick-a-Pic v2 as the authors hard-code them; smpo computes the
# range from the scored data instead (`score_range`) and keeps these only for comparison.
AUTHORS_PICKSCORE_COSINE_RANGE = (0.11543526500463486, 0.28201571106910706)


def _as_tensor(x: Tensor | float | np.ndarray) -> Tensor:
    if isinstance(x, Tensor):
        return x
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def normalise_score(score: Tensor | float, *, score_min: float, score_max: float) -> Tensor:
    """Eq. 11: ``s~ = (s - min S) / (max S - min S)``."""
    if not (math.isfinite(score_min) and math.isfinite(score_max)) or score_max <= score_min:
        raise ValueError(f"need finite score_min < score_max; got score_min={score_min}, score_max={score_max}")
    return (_as_tensor(score) - score_min) / (score_max - score_min)


def win_probability(score_w: Tensor | float, score_l: Tensor | float, *, score_min: float,
                    score_max: float) -> Tensor:
    """``p_w = exp(s~_w) / (exp(s~_w) + exp(s~_l)) = sigmoid(s~_w - s~_l)`` (Eq. 11).

    ``score_w`` and ``score_l`` are raw reward scores (any affine scale: a positive rescaling of
    the scores and of ``score_min``/``score_max`` together gives the same ``p_w``).
    """
    s_w = normalise_score(score_w, score_min=score_min, score_max=score_max)
    s_l = normalise_score(score_l, score_min=score_min, score_max=score_max)
    return torch.sigmoid(s_w - s_l)


def sensitivity_ratio(p_win: Tensor | float, gamma: float) -> Tensor:
    """Eq. 12, the weight-to-sensitivity ratio ``lambda = gamma * (2 p_w - 1)``."""
    return gamma * (2.0 * _as_tensor(p_win) - 1.0)


def score_range(scores: Iterable[Tensor | float | np.ndarray]) -> tuple[float, float]:
    """``(min S, max S)`` over every score of a dataset, given as one array or many chunks."""
    lo, hi, count = math.inf, -math.inf, 0
    chunks = [scores] if isinstance(scores, (Tensor, np.ndarray)) else scores
    for chunk in chunks:
        values = np.asarray(chunk.detach().cpu() if isinstance(chunk, Tensor) else chunk, dtype=np.float64)
        values = values.reshape(-1)
        if values.size == 0:
            continue
        if not np.isfinite(values).all():
            raise ValueError("scores contain NaN or infinite values")
        lo, hi, count = min(lo, float(values.min())), max(hi, float(values.max())), count + values.size
    if count == 0:
        raise ValueError("no scores: cannot compute the score range of an empty dataset")
    if hi <= lo:
        raise ValueError(f"all {count} scores equal {lo}: the min-max normalisation of Eq. 11 is undefined")
    return lo, hi
