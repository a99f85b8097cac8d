"""Which image of a pair won: the two kinds of labels a pair carries (ALGORITHM.md sections 2 and 4).

- ``binary``: the human label ``label_0`` in Pick-a-Pic's convention (1: image 0 preferred,
  0: image 1 preferred, 0.5: a tie), winning with probability 1. Ties name no winner: the
  pairwise methods drop them.
- ``smoothed``: the reward model's ``winner`` (0/1) and ``p_win``, the probability of that winner
  (Eq. 11), as `smpo label` writes them.

Pure Python (no torch), so the data readers below everything can use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LABELS: tuple[str, ...] = ("binary", "smoothed")

TIE = 0.5
"""The human label ``label_0`` of a tie."""


def is_tie(label_0: float | None) -> bool:
    """Whether a human label is a tie (a missing label, ``None``, is not)."""
    return label_0 is not None and float(label_0) == TIE


def human_winner(label_0: float | None) -> int | None:
    """The image the human preferred (``label_0``: 1 -> 0, 0 -> 1); ``None`` for a tie or no label."""
    if label_0 is None or is_tie(label_0):
        return None
    return 0 if float(label_0) == 1.0 else 1


def winner_of(row: Mapping[str, Any], labels: str) -> tuple[int, float]:
    """``(index of the preferred image, its win probability)`` of a labelled row.

    ``smoothed``: the reward model's winner and ``p_win`` (ALGORITHM.md section 2, Eq. 11).
    ``binary``: the human label ``label_0`` when the row has one (ties are filtered out before),
    else the reward model's winner; the probability is 1.
    """
    if labels == "smoothed":
        if row.get("winner") is None or row.get("p_win") is None:
            raise ValueError(f"pair {row.get('pair_id')!r} has no winner/p_win: smoothed labels need a dataset "
                             "labelled by `smpo label` (or use --labels binary)")
        return int(row["winner"]), float(row["p_win"])
    label = row.get("label_0")
    if label is not None:
        winner = human_winner(label)
        if winner is None:
            raise ValueError(f"pair {row.get('pair_id')!r} is a human tie; drop ties before taking binary labels")
        return winner, 1.0
    if row.get("winner") is None:
        raise ValueError(f"pair {row.get('pair_id')!r} has neither label_0 nor winner")
    return int(row["winner"]), 1.0
