import subprocess
import sys

import pytest
import torch
from PIL import Image

from smpo.rewards import SCORERS, load_scorer, scorer_names
from smpo.rewards.testing import save_tiny_scorer


def test_names():
    assert SCORERS == ("pickscore", "hpsv2.1", "imagereward", "aesthetic", "clip")
    assert scorer_names() == SCORERS + ("world",)


def test_world_resolves_lazily():
    pytest.importorskip("smpo.world.reward")
    scorer = load_scorer("world", device="cpu", dtype="fp32", batch_size=4)
    assert scorer.name == "world" and callable(scorer)


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown scorer 'hps'; choose from pickscore, hpsv2.1, imagereward, "
                                         r"aesthetic, clip, world"):
        load_scorer("hps")
    with pytest.raises(ValueError, match="no tiny model for scorer 'world'"):
        save_tiny_scorer("world", "unused")


def test_import_is_light():
    code = ("import sys, smpo.rewards; heavy = [m for m in ('transformers', 'smpo.rewards.clip_scorers', "
            "'smpo.rewards.imagereward', 'smpo.rewards.aesthetic') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_name_is_case_insensitive_and_output_contract(tiny_folder, images, prompts):
    scorer = load_scorer("PickScore", path=tiny_folder("pickscore"), device="cpu", dtype=torch.float32, batch_size=3)
    scores = scorer(images, prompts)
    assert scorer.name == "pickscore" and scorer.scale
    assert scores.shape == (5,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert scorer([], []).shape == (0,)


@pytest.mark.parametrize("name", SCORERS)
def test_input_errors(tiny_scorer, name):
    scorer = tiny_scorer(name)
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match=f"{name}: got 2 images but 1 prompts"):
        scorer([image, image], ["a"])
    with pytest.raises(TypeError, match=r"images\[1\] is a str"):
        scorer([image, "cat.png"], ["a", "b"])
    with pytest.raises(TypeError, match="a single string"):
        scorer([image], "a")


@pytest.mark.parametrize("name", SCORERS)
def test_batch_size_checked_before_loading(name):
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        load_scorer(name, path="does-not-exist", batch_size=0)


@pytest.mark.parametrize("name, tolerance", [("pickscore", 1.0), ("hpsv2.1", 1.0), ("clip", 1.0),
                                             ("imagereward", 0.1), ("aesthetic", 1e-3)])
def test_half_precision_scores_come_back_as_float32(tiny_folder, tiny_scorer, images, prompts, name, tolerance):
    half = load_scorer(name, path=tiny_folder(name), device="cpu", dtype="fp16")
    scores = half(images, prompts)
    assert scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert torch.allclose(scores, tiny_scorer(name)(images, prompts), atol=tolerance, rtol=0)
