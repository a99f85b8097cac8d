"""LAION aesthetic predictor: the real published head on a tiny CLIP backbone, checked by hand."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from smpo.rewards import load_scorer
from smpo.rewards.preprocess import clip_center_crop

# The real LAION head ships in the project's shared data, beside the checkout (as in CI).
REAL_HEAD = Path(os.environ.get(
    "SMPO_AESTHETIC_HEAD",
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth",
))
needs_real_head = pytest.mark.skipif(not REAL_HEAD.is_file(), reason=f"real aesthetic head not found at {REAL_HEAD}")


@pytest.fixture(scope="module")
def real_head_folder(tiny_folder, tmp_path_factory):
    """The tiny backbone (projection_dim 768) beside the published head file, under its original name."""
    folder = tmp_path_factory.mktemp("aesthetic-real")
    shutil.copytree(tiny_folder("aesthetic") / "clip", folder / "clip")
    shutil.copy(REAL_HEAD, folder / REAL_HEAD.name)
    return folder


@needs_real_head
def test_real_head_by_hand(real_head_folder, images, prompts):
    scorer = load_scorer("aesthetic", path=real_head_folder, device="cpu", batch_size=2)
    # The published file stores CUDA tensors; it must load on the CPU with weights_only=True.
    state = torch.load(REAL_HEAD, map_location="cpu", weights_only=True)
    assert torch.equal(scorer.head.layers[7].weight, state["layers.7.weight"])

    pixels = torch.stack([clip_center_crop(image, 32) for image in images])
    with torch.no_grad():
        embedding = scorer.backbone(pixel_values=pixels).image_embeds
    y = embedding / embedding.norm(dim=-1, keepdim=True)
    assert y.shape == (5, 768)
    for index in (0, 2, 4, 6, 7):  # Linear layers; the Dropouts in between are identities at inference
        y = y @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    scores = scorer(images, prompts)
    assert torch.allclose(scores, y.squeeze(-1), atol=1e-5)
    assert ((scores > 1) & (scores < 10)).all()  # on the predictor's 1-10 scale
    assert torch.equal(scores, scorer(images, ["something else"] * 5))  # the prompt is ignored
    one_by_one = torch.cat([scorer(images[i:i + 1], prompts[i:i + 1]) for i in range(5)])
    assert torch.allclose(scores, one_by_one, atol=1e-5, rtol=0)


def test_tiny_folder_is_deterministic(tiny_scorer, images, prompts):
    scorer = tiny_scorer("aesthetic")
    assert torch.equal(scorer(images, prompts), scorer(images, prompts))


def test_folder_without_head(tiny_folder, tmp_path):
    shutil.copytree(tiny_folder("aesthetic") / "clip", tmp_path / "clip")
    with pytest.raises(FileNotFoundError, match="no aesthetic head; expected one of head.safetensors, head.pth"):
        load_scorer("aesthetic", path=tmp_path)


def test_wrong_head_keys_and_wrong_width(tiny_folder, tmp_path):
    shutil.copytree(tiny_folder("aesthetic") / "clip", tmp_path / "clip")
    torch.save({"fc.weight": torch.zeros(1, 768)}, tmp_path / "head.pth")
    with pytest.raises(ValueError, match=r"head.pth: not a linear-stack head; expected keys layers"):
        load_scorer("aesthetic", path=tmp_path)
    from smpo.rewards.heads import LinearStackHead

    torch.save(LinearStackHead(16).state_dict(), tmp_path / "head.pth")
    with pytest.raises(ValueError, match="projection_dim is 768 but the head expects 16-d embeddings"):
        load_scorer("aesthetic", path=tmp_path)
