import io
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from smpo.world.grammar import split
from smpo.world.raters import Rater, label_pairs, make_raters, write_parquet
from smpo.world.render import render, render_batch


def test_rater_ties_below_margin_and_bradley_terry_above():
    rater = Rater(user_id=0, fidelity_weight=0.5, decisiveness=10.0, tie_margin=0.05)
    rng = np.random.default_rng(0)
    assert all(rater.label(0.70, 0.66, rng) == 0.5 for _ in range(100))  # |du| = 0.04 < 0.05
    # |du| = 0.1: the first wins with probability sigmoid(10 * 0.1) = 0.7311 (no ties).
    labels = np.array([rater.label(0.8, 0.7, rng) for _ in range(20000)])
    assert set(np.unique(labels)) == {0.0, 1.0}
    p = 1 / (1 + math.exp(-1.0))
    assert rater.prob_first(0.8, 0.7) == pytest.approx(p)
    assert labels.mean() == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / 20000))
    # Reversed order: the first now loses as often as it won.
    reversed_labels = np.array([rater.label(0.7, 0.8, rng) for _ in range(20000)])
    assert reversed_labels.mean() == pytest.approx(1 - p, abs=0.015)


def test_rater_utility_weighs_fidelity_against_quality():
    picky, aesthete = Rater(0, 0.9, 10.0, 0.0), Rater(1, 0.2, 10.0, 0.0)
    # Image A: faithful but blurry; image B: sharp but wrong.
    a, b = (0.9, 0.2), (0.4, 1.0)
    assert picky.utility(*a) == pytest.approx(0.9 * 0.9 + 0.1 * 0.2)
    assert picky.utility(*a) > picky.utility(*b)
    assert aesthete.utility(*a) < aesthete.utility(*b)


def test_make_raters_varied_and_reproducible():
    raters = make_raters(20, seed=1)
    assert raters == make_raters(20, seed=1)
    weights = [r.fidelity_weight for r in raters]
    assert 0.2 <= min(weights) and max(weights) <= 0.95 and np.std(weights) > 0.1
    assert len({r.user_id for r in raters}) == 20


def test_label_pairs_pick_a_pic_schema_with_ties(tmp_path):
    prompts = split("train")[:60]
    good = render_batch(prompts, seed=0)
    other = render_batch(prompts, seed=1)  # also correct: many near-equal pairs -> ties
    broken = [render(p.replace("white background", "black background").replace(
        "gray background", "white background").replace("black background", "gray background"), rng=i)
        for i, p in enumerate(prompts[:20])]
    pairs = list(zip(good, other[:40] + broken))
    rows = label_pairs(pairs, prompts, make_raters(5, seed=0), seed=0)
    path = write_parquet(rows, tmp_path / "train-00000-of-00001.parquet")
    frame = pd.read_parquet(path)
    for column in ("ranking_id", "user_id", "caption", "jpg_0", "jpg_1", "label_0", "label_1",
                   "image_0_uid", "image_1_uid", "best_image_uid", "has_label", "are_different"):
        assert column in frame.columns
    assert set(frame.label_0) <= {0.0, 0.5, 1.0}
    assert (frame.label_0 == 0.5).any(), "near-equal pairs should give ties"
    assert (frame.label_0 + frame.label_1 == 1.0).all()
    # The 20 pairs with a wrong background against a right render: the right one mostly wins.
    assert frame.label_0.iloc[40:].mean() > 0.7
    image = Image.open(io.BytesIO(frame.jpg_0.iloc[0]))
    assert image.size == (32, 32) and np.array_equal(np.asarray(image.convert("RGB")), np.asarray(good[0]))
    tie_rows = frame[frame.label_0 == 0.5]
    assert (tie_rows.best_image_uid == "").all()
