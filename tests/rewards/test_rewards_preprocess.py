import numpy as np
import pytest
import torch
from PIL import Image

from smpo.rewards.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    center_crop,
    clip_center_crop,
    hf_clip_center_crop,
    pad_to_square,
    resize_shorter_side,
)

MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)


def test_normalisation_of_a_flat_colour():
    # A flat (255, 0, 51) image stays flat under resize/crop: (v / 255 - mean) / std per channel.
    image = Image.new("RGB", (40, 20), (255, 0, 51))
    out = clip_center_crop(image, 16)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    expected = [(1.0 - 0.48145466) / 0.26862954, (0.0 - 0.4578275) / 0.26130258, (0.2 - 0.40821073) / 0.27577711]
    for channel, value in enumerate(expected):
        assert torch.allclose(out[channel], torch.full((16, 16), value), atol=1e-5)


def test_shorter_side_resize_and_crop_offsets():
    assert resize_shorter_side(Image.new("RGB", (45, 61)), 32).size == (32, 43)  # int(32 * 61 / 45) = 43
    assert resize_shorter_side(Image.new("RGB", (100, 37)), 32).size == (86, 32)  # int(86.49)
    # A 1-pixel-wide marker column tells where the crop starts: excess 11 -> round(5.5) = 6 vs 11 // 2 = 5.
    array = np.zeros((32, 43, 3), dtype=np.uint8)
    array[:, 5] = 255
    image = Image.fromarray(array)
    assert np.asarray(center_crop(image, 32))[:, 0].max() == 0  # torchvision: starts at column 6
    assert np.asarray(center_crop(image, 32, floor_offset=True))[:, 0].min() == 255  # transformers: column 5


def test_hf_variant_matches_transformers_clip_processor(random_image):
    pil_processor = pytest.importorskip("transformers.models.clip.image_processing_pil_clip").CLIPImageProcessorPil
    processor = pil_processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    for seed, (w, h) in enumerate([(45, 61), (100, 37), (71, 40)]):
        image = random_image(w, h, seed)
        reference = torch.from_numpy(np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0]))
        assert torch.allclose(hf_clip_center_crop(image, 32), reference, atol=1e-6)


def test_pad_to_square_wide_image():
    # 64x32 white -> 32x16 (longer side 32), pasted at rows 8..23 of a black 32x32 square.
    out = pad_to_square(Image.new("RGB", (64, 32), (255, 255, 255)), 32)
    assert out.shape == (3, 32, 32)
    black = (0 - MEAN) / STD
    white = (1 - MEAN) / STD
    assert torch.allclose(out[:, :8], black.expand(3, 8, 32), atol=1e-6)
    assert torch.allclose(out[:, 24:], black.expand(3, 8, 32), atol=1e-6)
    assert torch.allclose(out[:, 8:24], white.expand(3, 16, 32), atol=1e-5)


def test_pad_to_square_odd_padding_goes_after():
    # 32x21 -> no resize; pad 11 rows: 5 above, 6 below.
    out = pad_to_square(Image.new("RGB", (32, 21), (255, 255, 255)), 32)
    black = ((0 - MEAN) / STD)[:, 0, 0]
    column = out[:, :, 0]
    rows_black = [bool(torch.allclose(column[:, r], black, atol=1e-6)) for r in range(32)]
    assert rows_black == [True] * 5 + [False] * 21 + [True] * 6


def test_modes_are_converted_to_rgb():
    gray = Image.new("L", (32, 32), 128)
    rgb = Image.new("RGB", (32, 32), (128, 128, 128))
    assert torch.equal(clip_center_crop(gray, 32), clip_center_crop(rgb, 32))
    assert torch.equal(pad_to_square(gray, 32), pad_to_square(rgb, 32))


def test_crop_larger_than_image_is_refused():
    with pytest.raises(ValueError, match="cannot centre-crop 32x32 from a 20x40"):
        center_crop(Image.new("RGB", (20, 40)), 32)
