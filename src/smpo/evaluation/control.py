"""Conditioning images for ControlNet generation (paper section 5.3): canny edges and depth maps.

Canny edges are computed here in numpy (no OpenCV): Sobel gradients of the grey image, thinning by
non-maximum suppression along the gradient direction, and hysteresis between a low and a high
threshold. The thresholds apply to the L1 gradient magnitude ``|gx| + |gy|`` of 0-255 pixels, as
``cv2.Canny(image, low, high)`` does by default, so the usual ``100, 200`` give similar maps.

Depth maps are either given as images, or estimated with a transformers depth-estimation model
(e.g. DPT) and normalised to 0-255 per image, repeated on three channels.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

CONTROL_TYPES = ("canny", "depth")
# Paper section 5.3 / Appendix D: conditioning scale 0.3 for canny, 0.5 for depth, CFG 5 for both.
DEFAULT_CONDITIONING_SCALE = {"canny": 0.3, "depth": 0.5}
CONTROL_GUIDANCE_SCALE = 5.0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def canny_edges(image: Image.Image, low: float = 100.0, high: float = 200.0) -> Image.Image:
    """Canny edge map of ``image``: white (255) edges on black, RGB, same size."""
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds need 0 <= low <= high, got low={low}, high={high}")
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    gx, gy = _sobel(grey)
    magnitude = np.abs(gx) + np.abs(gy)
    thin = _non_maximum_suppression(magnitude, gx, gy)
    edges = _hysteresis(thin, low, high)
    mask = (edges * 255).astype(np.uint8)
    return Image.fromarray(np.stack([mask] * 3, axis=-1))


def _sobel(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.pad(grey, 1, mode="edge")
    h, w = grey.shape

    def s(dy: int, dx: int) -> np.ndarray:  # the pixel at offset (dy, dx) from each pixel
        return p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (s(-1, 1) + 2 * s(0, 1) + s(1, 1)) - (s(-1, -1) + 2 * s(0, -1) + s(1, -1))
    gy = (s(1, -1) + 2 * s(1, 0) + s(1, 1)) - (s(-1, -1) + 2 * s(-1, 0) + s(-1, 1))
    return gx, gy


def _non_maximum_suppression(magnitude: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Keep a pixel only if its magnitude is a maximum along the (4-way quantised) gradient direction.

    Ties are broken one way (strictly greater than the neighbour before, at least the one after) so
    that a step edge, whose two sides have equal magnitude, comes out one pixel wide.
    """
    angle = (np.degrees(np.arctan2(gy, gx)) + 180.0) % 180.0
    p = np.pad(magnitude, 1)
    h, w = magnitude.shape

    def s(dy: int, dx: int) -> np.ndarray:
        return p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    # direction bins: 0 deg (compare left/right), 45, 90 (up/down), 135 (rows grow downwards)
    bins = [((angle < 22.5) | (angle >= 157.5), (0, -1), (0, 1)),
            ((angle >= 22.5) & (angle < 67.5), (-1, -1), (1, 1)),
            ((angle >= 67.5) & (angle < 112.5), (-1, 0), (1, 0)),
            ((angle >= 112.5) & (angle < 157.5), (-1, 1), (1, -1))]
    keep = np.zeros_like(magnitude, dtype=bool)
    for in_bin, before, after in bins:
        keep |= in_bin & (magnitude > s(*before)) & (magnitude >= s(*after))
    return np.where(keep, magnitude, 0.0)


def _hysteresis(magnitude: np.ndarray, low: float, high: float) -> np.ndarray:
    """Strong pixels (>= high) plus weak pixels (>= low) 8-connected to a strong one."""
    weak = magnitude >= low
    edges = magnitude >= high
    while True:
        p = np.pad(edges, 1)
        h, w = edges.shape
        grown = np.zeros_like(edges)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                grown |= p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        grown &= weak
        if (grown == edges).all():
            return edges
        edges = grown


class DepthEstimator:
    """Depth maps with a transformers depth-estimation model (folder or hub id, e.g. DPT), loaded once.

    Each map is resized to its image, normalised to 0-255 by its own min and max (near is bright
    for DPT-style inverse-depth outputs), and repeated on three channels.
    """

    def __init__(self, model: str | os.PathLike, *, device: str = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        self.device = device
        self.processor = AutoImageProcessor.from_pretrained(model)
        self.network = AutoModelForDepthEstimation.from_pretrained(model).to(device).eval()

    def __call__(self, image: Image.Image) -> Image.Image:
        import torch

        rgb = image.convert("RGB")
        inputs = self.processor(images=rgb, return_tensors="pt").to(self.device)
        with torch.no_grad():
            depth = self.network(**inputs).predicted_depth  # [1, h, w]
        depth = torch.nn.functional.interpolate(depth[:, None].float(), size=rgb.size[::-1], mode="bicubic",
                                                align_corners=False)[0, 0]
        span = depth.max() - depth.min()
        depth = (depth - depth.min()) / span if span > 0 else torch.zeros_like(depth)
        grey = (depth.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return Image.fromarray(np.stack([grey] * 3, axis=-1))


class ControlImages:
    """The conditioning image of each prompt, read from ``folder`` and made on demand.

    ``canny``: edges of the source image (:func:`canny_edges`) unless ``maps`` says the images are
    edge maps already. ``depth``: the images are depth maps, unless ``depth_model`` names a depth
    estimator to compute them from ordinary images.
    """

    def __init__(self, folder: str | os.PathLike, control_type: str, *, maps: bool = False,
                 canny_low: float = 100.0, canny_high: float = 200.0,
                 depth_model: str | os.PathLike | None = None, device: str = "cpu") -> None:
        if control_type not in CONTROL_TYPES:
            raise ValueError(f"unknown control type {control_type!r}; choose from {', '.join(CONTROL_TYPES)}")
        self.sources = source_images_by_index(folder)
        self.folder = Path(folder)
        self.control_type = control_type
        self.maps = maps or (control_type == "depth" and depth_model is None)
        self.canny = (canny_low, canny_high)
        self.depth = DepthEstimator(depth_model, device=device) if control_type == "depth" and not self.maps else None

    def __call__(self, prompt_index: int) -> Image.Image:
        if isinstance(self.sources, Path):
            path = self.sources
        elif prompt_index in self.sources:
            path = self.sources[prompt_index]
        else:
            raise KeyError(f"no control image for prompt {prompt_index} in {self.folder}")
        image = Image.open(path).convert("RGB")
        if self.maps:
            return image
        return canny_edges(image, *self.canny) if self.control_type == "canny" else self.depth(image)


def source_images_by_index(folder: str | os.PathLike) -> dict[int, Path] | Path:
    """The conditioning source images of ``folder``, keyed by prompt index.

    Either an ``smpo generate`` output (its manifest: the first image of each prompt), or files
    whose name is a prompt index (``12.png``, ``00012.jpg``), or a single image (``folder`` is
    that file, or a folder holding only it) used for every prompt, returned as a bare path.
    """
    folder = Path(folder)
    if folder.is_file():
        return folder
    manifest = folder / "manifest.jsonl"
    if manifest.is_file():
        from smpo.evaluation.manifest import read_manifest

        rows = read_manifest(folder)
        return {r.prompt_index: folder / r.file for r in sorted(rows, key=lambda r: -r.image_index)}
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the control image folder {folder}")
    if len(files) == 1:
        return files[0]
    numbered = {int(p.stem): p for p in files if re.fullmatch(r"\d+", p.stem)}
    if len(numbered) != len(files):
        odd = next(p.name for p in files if not re.fullmatch(r"\d+", p.stem))
        raise ValueError(f"control image {folder / odd}: name it by its prompt index (e.g. 00012.png), "
                         "or give an `smpo generate` output folder")
    return numbered
