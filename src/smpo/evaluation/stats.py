"""The statistics of the paper's evaluation (ALGORITHM.md section 7, Table 2, Appendix F).

- median and mean of a scorer's scores over all images of a model;
- win rate of model A over model B: over the pairs of images with the same prompt and seed, the
  share where the scorer gives A's image the higher score, a tie counting one half::

      WR(A, B) = (#{a_k > b_k} + 0.5 * #{a_k = b_k}) / K

  (so WR(A, B) + WR(B, A) = 1 exactly);
- percentile bootstrap intervals: resample the *prompts* with replacement (all images of a drawn
  prompt come along, so several images per prompt are not counted as independent evidence),
  recompute the statistic, and take the ``(1 - c) / 2`` and ``(1 + c) / 2`` quantiles of the
  ``num_resamples`` recomputed values (linear interpolation between order statistics).

Every table that shows an estimate with its interval (``smpo compare``'s Table 2, the demo's and
the study's reports) writes its cells with :func:`format_interval` / :func:`win_rate_cell`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Statistic = Callable[..., np.ndarray]  # numpy-style: statistic(array, axis=...)
STATISTICS: dict[str, Statistic] = {"median": np.median, "mean": np.mean}
_BLOCK = 100  # resamples computed at once (memory: _BLOCK x number of values)


def median(values: Sequence[float] | np.ndarray) -> float:
    return float(np.median(_as_array(values)))


def mean(values: Sequence[float] | np.ndarray) -> float:
    return float(np.mean(_as_array(values)))


def win_outcomes(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per pair: 1 where ``a > b``, 0.5 where equal, 0 where ``a < b``."""
    a, b = _as_array(a), _as_array(b)
    if a.shape != b.shape:
        raise ValueError(f"win rate needs paired scores; got {a.shape[0]} and {b.shape[0]} values")
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def win_rate(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Share of pairs where ``a`` beats ``b`` (ties count one half)."""
    return mean(win_outcomes(a, b))


# Student's t 0.975 quantiles for 1..30 degrees of freedom (two-sided 95% intervals).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_interval(values: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """Mean and two-sided 95% Student-t interval of independent replicates (e.g. one value per
    seed); the interval is ``(nan, nan)`` for fewer than two values."""
    values = _as_array(values)
    m = float(values.mean()) if values.size else float("nan")
    if values.size < 2:
        return m, float("nan"), float("nan")
    df = values.size - 1
    half = (_T975[df - 1] if df <= len(_T975) else 1.96) * float(values.std(ddof=1)) / np.sqrt(values.size)
    return m, m - half, m + half


def format_interval(interval: Sequence[float], digits: int, *, sign: bool = False) -> str:
    """``estimate [low, high]`` of an ``(estimate, low, high)`` triple at ``digits`` decimals
    (``sign``: a ``+`` before positive numbers); the estimate alone when the interval is NaN
    (:func:`t_interval` of one replicate)."""
    estimate, low, high = interval
    number = f"{{:{'+' if sign else ''}.{digits}f}}"
    if math.isnan(low):
        return number.format(estimate)
    return f"{number.format(estimate)} [{number.format(low)}, {number.format(high)}]"


def win_rate_cell(percent: float, low: float, high: float) -> str:
    """A win rate and its interval, in percent, as a table cell: ``52.3 [48.1, 56.0]``; ``-`` where
    there is no win rate (NaN: a model against itself)."""
    if math.isnan(percent):
        return "-"
    return format_interval((percent, low, high), 1)


def bootstrap_interval(values: Sequence[float] | np.ndarray, statistic: str | Statistic = "median", *,
                       groups: Sequence | np.ndarray | None = None, num_resamples: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(values)``, resampling ``groups`` (default: each value).

    ``groups[k]`` is the group (the prompt) of ``values[k]``; a resample draws as many groups as
    there are, with replacement, and keeps all values of each drawn group.
    """
    values = _as_array(values)
    stat = STATISTICS[statistic] if isinstance(statistic, str) else statistic
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be at least 1, got {num_resamples}")
    members = _group_members(values.shape[0], groups)
    rng = np.random.default_rng(seed)
    draws = [_resample_statistics(values, members, stat, rng, min(_BLOCK, num_resamples - done))
             for done in range(0, num_resamples, _BLOCK)]
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.concatenate(draws), [tail, 1.0 - tail])
    return float(low), float(high)


def _group_members(n: int, groups: Sequence | np.ndarray | None) -> list[np.ndarray]:
    if n == 0:
        raise ValueError("cannot bootstrap an empty set of values")
    if groups is None:
        return [np.array([k]) for k in range(n)]
    groups = np.asarray(groups)
    if groups.shape[0] != n:
        raise ValueError(f"groups has {groups.shape[0]} entries for {n} values")
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    return np.split(order, np.cumsum(counts)[:-1])


def _resample_statistics(values: np.ndarray, members: list[np.ndarray], stat: Statistic,
                         rng: np.random.Generator, count: int) -> np.ndarray:
    picks = rng.integers(0, len(members), size=(count, len(members)))
    sizes = {m.shape[0] for m in members}
    if len(sizes) == 1:  # equal group sizes (e.g. N images per prompt): one vectorised gather
        matrix = values[np.stack(members)]  # [groups, size]
        return stat(matrix[picks].reshape(count, -1), axis=1)
    return np.array([stat(np.concatenate([values[members[g]] for g in row])) for row in picks])


def _as_array(values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if np.isnan(array).any():
        raise ValueError("scores contain NaN")
    return array
