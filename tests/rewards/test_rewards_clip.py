"""PickScore, CLIP and HPS v2.1: multiplier x cosine, checked against the CLIPModel's own sub-modules."""

import math

import pytest
import torch

from smpo.rewards.preprocess import clip_center_crop, hf_clip_center_crop, pad_to_square


def hand_cosine(model, tokenizer, pixels, prompts):
    """cos(visual_projection(vision pooled), text_projection(text pooled)) computed step by step."""
    image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    text = model.text_projection(model.text_model(input_ids=tokens["input_ids"],
                                                  attention_mask=tokens["attention_mask"]).pooler_output)
    return (image * text).sum(-1) / (image.norm(dim=-1) * text.norm(dim=-1))


@pytest.mark.parametrize("name, transform, multiplier", [
    ("pickscore", hf_clip_center_crop, 50.0),  # the tiny PickScore's logit_scale is log(50)
    ("clip", clip_center_crop, 100.0),
    ("hpsv2.1", pad_to_square, 100.0),
])
def test_score_is_multiplier_times_cosine(tiny_scorer, images, prompts, name, transform, multiplier):
    scorer = tiny_scorer(name)
    assert scorer.multiplier == pytest.approx(multiplier, rel=1e-6)
    pixels = torch.stack([transform(image, 32) for image in images])
    assert torch.equal(scorer.pixel_values(images), pixels)
    with torch.no_grad():
        expected_cosine = hand_cosine(scorer.model, scorer.tokenizer, pixels, prompts)
    cosine = scorer.cosine(images, prompts)
    assert torch.allclose(cosine, expected_cosine, atol=1e-5)
    assert torch.allclose(scorer(images, prompts), multiplier * expected_cosine, atol=1e-4)
    assert cosine.abs().max() <= 1 and cosine.std() > 1e-3  # real cosines that differ between inputs


@pytest.mark.parametrize("name", ["pickscore", "clip", "hpsv2.1"])
def test_same_input_same_score_at_any_batch_size(tiny_scorer, images, prompts, name):
    scorer = tiny_scorer(name)
    first = scorer(images, prompts)
    assert torch.equal(first, scorer(images, prompts))
    one_at_a_time = torch.cat([scorer(images[i:i + 1], prompts[i:i + 1]) for i in range(len(images))])
    assert torch.allclose(first, one_at_a_time, atol=1e-4, rtol=0)


def test_long_prompt_is_truncated_to_the_context(tiny_scorer):
    scorer = tiny_scorer("pickscore")
    assert scorer.max_length == 77
    tokens = scorer.tokenizer(["a " * 200], padding="max_length", truncation=True, max_length=scorer.max_length)
    assert len(tokens["input_ids"][0]) == 77


def test_pickscore_uses_learned_logit_scale(tiny_scorer, images, prompts):
    scorer = tiny_scorer("pickscore")
    assert math.isclose(scorer.model.logit_scale.exp().item(), 50.0, rel_tol=1e-6)
    ratio = scorer(images, prompts) / scorer.cosine(images, prompts)
    assert torch.allclose(ratio, torch.full_like(ratio, 50.0), rtol=1e-4)


def test_file_instead_of_folder_is_refused(tmp_path):
    from smpo.rewards import load_scorer

    weights = tmp_path / "model.bin"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="is a file; this scorer expects a transformers CLIPModel folder"):
        load_scorer("pickscore", path=weights)
