"""The world's pair set: generators of graded quality, the shipped set and the command that made it."""

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from smpo.world.grammar import split
from smpo.world.pairset import GENERATOR_WEIGHTS, defective_render, draw_pairs, make_pair_set, pair_set_path
from smpo.world.raters import PAIRS_FILE
from smpo.world.render import render
from smpo.world.reward import WorldScorer


def test_splits_validation_is_carved_out_of_train():
    train, pairs, validation, held_out = (set(split(n)) for n in ("train", "pairs", "validation", "held_out"))
    assert pairs | validation == train and not pairs & validation and not train & held_out
    assert (len(train), len(pairs), len(validation), len(held_out)) == (357, 312, 45, 93)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        split("test")


def test_defective_generators_score_below_the_true_render():
    scorer = WorldScorer()
    prompts = split("pairs")[:24]
    clean = scorer([render(p, rng=np.random.default_rng(i)) for i, p in enumerate(prompts)], prompts)
    for generator in ("render-blur", "render-noise", "render-wrong-colour", "render-wrong-position"):
        images = [defective_render(p, generator, np.random.default_rng(i)) for i, p in enumerate(prompts)]
        defect = scorer(images, prompts)
        assert float((clean - defect).mean()) > 0.1, generator
    # The clean generator is the renderer itself.
    same = defective_render(prompts[0], "render", np.random.default_rng(0))
    assert np.array_equal(np.asarray(same), np.asarray(render(prompts[0], rng=np.random.default_rng(0))))
    with pytest.raises(ValueError, match="unknown generator 'sketch'"):
        defective_render(prompts[0], "sketch", np.random.default_rng(0))


def test_draw_pairs_is_seeded_and_covers_every_generator():
    prompts, generators = draw_pairs(2048, seed=0)
    assert (prompts, generators) == draw_pairs(2048, seed=0)
    assert draw_pairs(64, seed=1) != draw_pairs(64, seed=0)
    assert set(prompts) == set(split("pairs"))  # several pairs per prompt, no validation prompt
    counts = pd.Series([g for pair in generators for g in pair]).value_counts(normalize=True)
    for name, weight in GENERATOR_WEIGHTS.items():
        assert counts[name] == pytest.approx(weight / sum(GENERATOR_WEIGHTS.values()), abs=0.03), name


def _image(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_shipped_pair_set_is_what_its_command_makes():
    folder = pair_set_path()
    recipe = json.loads((folder / "pairset.json").read_text())
    frame = pd.read_parquet(folder / PAIRS_FILE)
    assert len(frame) == recipe["pairs"] == 2048
    prompts, generators = draw_pairs(recipe["pairs"], recipe["seed"], recipe["generator_weights"])
    assert frame.caption.tolist() == prompts
    assert list(zip(frame.model_0, frame.model_1)) == generators
    assert set(frame.label_0) <= {0.0, 0.5, 1.0} and frame.user_id.nunique() > 10
    # Every rendered image is the generator's output for (seed, pair, side), byte for byte.
    for i in range(0, 2048, 97):
        for k in (0, 1):
            if generators[i][k] != "world-base":
                expected = defective_render(prompts[i], generators[i][k], np.random.default_rng([recipe["seed"], i, k]))
                assert np.array_equal(_image(frame[f"jpg_{k}"][i]), np.asarray(expected)), (i, k)
    # The raters prefer the true render over the base's samples most of the time.
    render_vs_base = frame[(frame.model_0 == "render") & (frame.model_1 == "world-base")]
    assert len(render_vs_base) > 50 and render_vs_base.label_0.mean() > 0.8


def test_make_pair_set_writes_pick_a_pic_schema_and_is_deterministic(tmp_path):
    from smpo.world.model import base_path

    a = make_pair_set(base_path(), tmp_path / "a", pairs=6, seed=3, progress=False)
    b = make_pair_set(base_path(), tmp_path / "b", pairs=6, seed=3, progress=False)
    fa, fb = pd.read_parquet(a / PAIRS_FILE), pd.read_parquet(b / PAIRS_FILE)
    pd.testing.assert_frame_equal(fa, fb)
    assert set(fa.model_0) | set(fa.model_1) <= set(GENERATOR_WEIGHTS)
    assert fa.image_0_uid.tolist() == [f"{i:06d}-0" for i in range(6)]
    assert json.loads((a / "pairset.json").read_text())["command"].startswith("smpo world pairs")
