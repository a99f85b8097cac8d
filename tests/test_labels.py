"""Which image of a pair won: human labels (ties) and the reward model's winner."""

from __future__ import annotations

import pytest

from smpo.labels import TIE, human_winner, is_tie, winner_of


def test_human_label_names_the_preferred_image_and_a_tie_names_none():
    assert [human_winner(label) for label in (1.0, 0.0, TIE, None)] == [0, 1, None, None]
    assert [is_tie(label) for label in (1.0, 0.0, 0.5, None)] == [False, False, True, False]


def test_binary_labels_refuse_a_tie_that_was_not_dropped():
    with pytest.raises(ValueError, match="pair 't' is a human tie"):
        winner_of({"pair_id": "t", "label_0": 0.5, "winner": 0, "p_win": 0.6}, "binary")
    assert winner_of({"pair_id": "t", "label_0": 0.5, "winner": 0, "p_win": 0.6}, "smoothed") == (0, 0.6)
    with pytest.raises(ValueError, match="pair 'n' has neither label_0 nor winner"):
        winner_of({"pair_id": "n"}, "binary")
