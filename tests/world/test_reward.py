import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from smpo.world.grammar import BACKGROUNDS, COLOURS, Attributes, parse_prompt, split, to_prompt
from smpo.world.render import render, render_batch
from smpo.world.reward import WorldRewardConfig, load_world_scorer

PROMPT = "a small red square on the left, white background"


def test_exact_square_scores_computed_by_hand():
    """A pixel-exact red square on pure white: every measurement can be worked out by hand."""
    image = Image.new("RGB", (32, 32), BACKGROUNDS["white"])
    ImageDraw.Draw(image).rectangle([6, 12, 13, 19], fill=COLOURS["red"])  # 8 x 8 pixels
    parts = load_world_scorer().components([image], [PROMPT])
    cfg = WorldRewardConfig()
    # Exact colours -> colour and background errors are 0.
    assert parts["colour"].item() == pytest.approx(1.0)
    assert parts["background"].item() == pytest.approx(1.0)
    # Centroid (10/32, 16/32) vs the left position (0.3, 0.5): distance 0.0125.
    assert parts["position"].item() == pytest.approx(math.exp(-((10 / 32 - 0.3) / cfg.position_sigma) ** 2), rel=1e-5)
    # Area 64 vs expected (2 * 0.13 * 32)^2 = 69.2224 for a small square.
    assert parts["size"].item() == pytest.approx(math.exp(-(math.log(69.2224 / 64) / cfg.size_sigma) ** 2), rel=1e-5)
    # A square fills its bounding box exactly; no half-way pixels -> sharp; no noise -> clean.
    assert parts["shape"].item() == pytest.approx(1.0)
    assert parts["sharpness"].item() == pytest.approx(1.0)
    assert parts["cleanliness"].item() == pytest.approx(1.0)
    fidelity = (1 + 1 + 1 + parts["position"].item() + parts["size"].item()) / 5
    assert parts["fidelity"].item() == pytest.approx(fidelity, rel=1e-5)
    assert parts["reward"].item() == pytest.approx(0.7 * fidelity + 0.3, rel=1e-5)


WRONG = {"colour": "blue", "shape": "triangle", "size": "large", "position": "right", "background": "black"}


@pytest.mark.parametrize("attribute", sorted(WRONG))
def test_correct_render_outranks_a_render_with_one_wrong_attribute(attribute):
    scorer = load_world_scorer()
    for seed, prompt in enumerate(["a small red square on the left, white background",
                                   "a large green circle in the center, gray background",
                                   "a small purple triangle at the bottom, black background"]):
        right = render(prompt, rng=seed)
        a = parse_prompt(prompt).__dict__ | {attribute: WRONG[attribute]}
        if a[attribute] == getattr(parse_prompt(prompt), attribute):
            a[attribute] = {"colour": "yellow", "shape": "circle", "size": "small", "position": "top",
                            "background": "white"}[attribute]
        wrong = render(Attributes(**a), rng=seed)
        scores = scorer([right, wrong], [prompt, prompt])
        assert scores[0] > scores[1] + 0.05, (attribute, prompt, scores)


def test_blur_and_noise_lower_the_reward():
    scorer = load_world_scorer()
    prompts = split("held_out")[:20]
    clean = render_batch(prompts, seed=1)
    blurred = [im.filter(ImageFilter.GaussianBlur(1.2)) for im in clean]
    rng = np.random.default_rng(0)
    noisy = [Image.fromarray(np.clip(np.asarray(im, float) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8))
             for im in clean]
    r_clean, r_blur, r_noise = (scorer(x, prompts) for x in (clean, blurred, noisy))
    assert (r_clean > r_blur).float().mean() >= 0.9
    assert (r_clean > r_noise).all()
    q = scorer.components(clean, prompts)["quality"].mean()
    assert q > scorer.components(blurred, prompts)["quality"].mean() + 0.3


def test_renders_score_high_and_scorer_interface():
    scorer = load_world_scorer(device="cpu")
    assert scorer.name == "world"
    prompts = [to_prompt(a) for a in [Attributes("yellow", "circle", "large", "top", "gray")]] * 4
    scores = scorer(render_batch(prompts, seed=3), prompts)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    assert scores.min() > 0.8 and scores.max() <= 1.0
    assert load_world_scorer(dtype="fp16")(render_batch(prompts[:1]), prompts[:1]).dtype == torch.float16


def test_registered_in_smpo_rewards():
    from smpo.rewards import load_scorer

    scorer = load_scorer("world")
    assert scorer.name == "world"
    image = render(PROMPT, rng=0)
    assert scorer([image], [PROMPT]).item() == pytest.approx(load_world_scorer()([image], [PROMPT]).item())


def test_load_world_scorer_settings(tmp_path):
    path = tmp_path / "world.json"
    path.write_text('{"fidelity_weight": 1.0}')
    assert load_world_scorer(path).config.fidelity_weight == 1.0
    assert load_world_scorer(path, fidelity_weight=0.5).config.fidelity_weight == 0.5
    with pytest.raises(ValueError, match="unknown world reward setting"):
        load_world_scorer(colour_weight=2.0)
    with pytest.raises(ValueError, match="item 1"):
        load_world_scorer()([render(PROMPT), render(PROMPT)], [PROMPT, "a photo of a cat"])
