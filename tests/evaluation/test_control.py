import numpy as np
import pytest
from PIL import Image

from smpo.evaluation.control import (
    CONTROL_GUIDANCE_SCALE,
    DEFAULT_CONDITIONING_SCALE,
    ControlImages,
    canny_edges,
    source_images_by_index,
)


def _square(value: int = 255) -> Image.Image:
    pixels = np.zeros((16, 16), np.uint8)
    pixels[4:12, 4:12] = value
    return Image.fromarray(pixels).convert("RGB")


def test_paper_control_defaults():
    assert DEFAULT_CONDITIONING_SCALE == {"canny": 0.3, "depth": 0.5}
    assert CONTROL_GUIDANCE_SCALE == 5.0


def test_canny_outlines_a_square_one_pixel_wide():
    edges = np.asarray(canny_edges(_square()))
    assert edges.shape == (16, 16, 3) and set(np.unique(edges)) == {0, 255}
    mask = edges[..., 0] > 0
    # A step edge has equal Sobel magnitude on both sides; the tie goes to the side whose
    # neighbour "before" (left / above) is weaker: column 3 (outside) on the left, column 11
    # (inside) on the right, row 3 on top, row 11 at the bottom.
    for row in range(5, 11):
        assert np.flatnonzero(mask[row]).tolist() == [3, 11]
    assert np.flatnonzero(mask[3]).tolist() == [5, 6, 7, 8, 9, 10]
    assert not mask[5:11, 4:11].any()  # the flat inside
    assert not mask[:3].any() and not mask[13:].any() and not mask[:, :3].any() and not mask[:, 13:].any()


def test_canny_thresholds_and_flat_images():
    assert not np.asarray(canny_edges(Image.new("RGB", (16, 16), (90, 90, 90)))).any()
    # A step of 20 grey levels has Sobel L1 magnitude 4 * 20 = 80: below the default low threshold 100 ...
    assert not np.asarray(canny_edges(_square(20))).any()
    # ... and an edge once the high threshold is below 80.
    assert np.asarray(canny_edges(_square(20), low=50, high=70)).any()
    with pytest.raises(ValueError, match="low <= high"):
        canny_edges(_square(), low=200, high=100)


def test_control_images_by_prompt_index(tmp_path):
    _square().save(tmp_path / "00002.png")
    Image.new("RGB", (16, 16), (10, 200, 30)).save(tmp_path / "7.png")
    canny = ControlImages(tmp_path, "canny")
    assert np.array_equal(np.asarray(canny(2)), np.asarray(canny_edges(_square())))
    maps = ControlImages(tmp_path, "depth")  # no depth estimator: the images are the maps
    assert np.asarray(maps(7))[0, 0].tolist() == [10, 200, 30]
    with pytest.raises(KeyError, match="no control image for prompt 3"):
        canny(3)


def test_control_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images"):
        source_images_by_index(tmp_path)
    _square().save(tmp_path / "one.png")
    assert source_images_by_index(tmp_path) == tmp_path / "one.png"  # a single image serves every prompt
    _square().save(tmp_path / "two.png")
    with pytest.raises(ValueError, match="name it by its prompt index"):
        source_images_by_index(tmp_path)
    with pytest.raises(ValueError, match="unknown control type"):
        ControlImages(tmp_path, "pose")


def _save_tiny_dpt(folder):
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
                       image_size=32, patch_size=8, backbone_out_indices=[0, 1, 2, 3],
                       neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5])
    torch.manual_seed(0)
    DPTForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_depth_maps_from_a_depth_estimator(tmp_path):
    model = _save_tiny_dpt(tmp_path / "dpt")
    images = tmp_path / "images"
    images.mkdir()
    _square().resize((24, 20)).save(images / "0.png")
    depth = ControlImages(images, "depth", depth_model=model)
    assert not depth.maps
    made = np.asarray(depth(0))
    assert made.shape == (20, 24, 3)  # the source image's size, grey on three channels
    assert (made[..., 0] == made[..., 1]).all() and (made[..., 0] == made[..., 2]).all()
    assert (made.min(), made.max()) == (0, 255)  # normalised per image to the full range
