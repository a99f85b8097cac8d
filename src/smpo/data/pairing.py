"""How ``smpo pairs`` forms pairs from one prompt's scored images (pure functions of the scores).

A prompt has ``n`` images (K per generator, every generator), each with a score. A candidate pair
is two of them whose scores differ by at least ``min_gap`` (and by more than 0: equal scores have
no winner); with ``across_generators`` only images of two different generators. Then:

- ``best-worst``: the best image against the worst, then the second best against the second
  worst, ... (each image in at most one pair), up to ``pairs_per_prompt`` pairs; a rank pair whose
  gap is below ``min_gap`` (or that ``across_generators`` forbids) is passed over.
- ``gap``: every candidate pair, the largest gap first (ties: by image order), up to
  ``pairs_per_prompt`` (``None``: all of them).
- ``random``: ``pairs_per_prompt`` candidate pairs drawn without replacement, uniformly, by a
  generator seeded with ``(seed, prompt index)``, in the order drawn.

Images are ordered by (generator order, image index); ranking ties are broken by that order. Each
pair is returned as ``(winner, loser)``; which one is stored as image 0 is a seeded coin per pair
(:func:`winner_first`), so that neither side of the set is always the winner.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

import numpy as np

PairingRule = Literal["best-worst", "gap", "random"]
PAIRING_RULES: tuple[str, ...] = ("best-worst", "gap", "random")


def _candidate(i: int, j: int, scores: Sequence[float], groups: Sequence[int] | None, min_gap: float) -> bool:
    gap = abs(scores[i] - scores[j])
    return gap > 0 and gap >= min_gap and (groups is None or groups[i] != groups[j])


def _as_winner_loser(i: int, j: int, scores: Sequence[float]) -> tuple[int, int]:
    return (i, j) if scores[i] > scores[j] else (j, i)


def form_pairs(scores: Sequence[float], *, rule: str, min_gap: float = 0.0, pairs_per_prompt: int | None = 1,
               groups: Sequence[int] | None = None, seed: int = 0, prompt_index: int = 0) -> list[tuple[int, int]]:
    """The pairs ``(winner, loser)`` (indices into ``scores``) of one prompt under ``rule``.

    ``groups[i]`` is the generator of image ``i``; given, only images of different generators pair.
    """
    if rule not in PAIRING_RULES:
        raise ValueError(f"unknown pairing rule {rule!r}; choose from {', '.join(PAIRING_RULES)}")
    if pairs_per_prompt is not None and pairs_per_prompt < 1:
        raise ValueError(f"pairs_per_prompt must be at least 1 (or None: all), got {pairs_per_prompt}")
    if min_gap < 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap}")
    n = len(scores)
    limit = n * n if pairs_per_prompt is None else pairs_per_prompt
    if rule == "best-worst":
        ranked = sorted(range(n), key=lambda i: (-scores[i], i))
        pairs = []
        for r in range(n // 2):
            best, worst = ranked[r], ranked[n - 1 - r]
            if _candidate(best, worst, scores, groups, min_gap):
                pairs.append((best, worst))
        return pairs[:limit]
    candidates = [(i, j) for i, j in itertools.combinations(range(n), 2) if _candidate(i, j, scores, groups, min_gap)]
    if rule == "gap":
        candidates.sort(key=lambda ij: (-abs(scores[ij[0]] - scores[ij[1]]), ij))
        return [_as_winner_loser(i, j, scores) for i, j in candidates[:limit]]
    rng = np.random.default_rng([seed, prompt_index])
    drawn = rng.permutation(len(candidates))[:limit] if candidates else []
    return [_as_winner_loser(*candidates[int(k)], scores) for k in drawn]


def winner_first(seed: int, prompt_index: int, pair_index: int) -> bool:
    """Whether pair ``pair_index`` of prompt ``prompt_index`` stores its winner as image 0 (a seeded coin)."""
    return bool(np.random.default_rng([seed, prompt_index, pair_index, 1]).integers(2))
