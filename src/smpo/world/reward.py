"""The miniature world's reward model (it plays PickScore's part): prompt fidelity and image quality.

Everything is measured from the pixels alone, with no network:

- the background colour is the median of the image's one-pixel border;
- the object is the set of pixels far (``FOREGROUND_DISTANCE``) from that colour: its mean colour,
  centroid, area and fill of its bounding box give the colour, position, size and shape;
- quality is sharpness (how wide the band of half-way pixels around the object is, relative to
  its perimeter) times cleanliness (how far most pixels stray from their 3x3 median: noise, speckles).

Each attribute gives a soft score in [0, 1] (a Gaussian kernel of the measured error), so the
reward varies smoothly, as a learned reward model's does; the reward is
``fidelity_weight * fidelity + (1 - fidelity_weight) * quality``, in [0, 1]. The scorer has the
interface of ``smpo.rewards``: ``scorer(images, prompts) -> Tensor[B]`` and a ``name``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image, ImageFilter

from smpo.world.grammar import BACKGROUNDS, COLOURS, parse_prompt
from smpo.world.render import FILL, expected_area, expected_centroid

FOREGROUND_DISTANCE = 50.0  # RGB distance from the background beyond which a pixel is the object


@dataclass(frozen=True)
class WorldRewardConfig:
    """Widths of the soft attribute scores and the fidelity / quality balance."""

    fidelity_weight: float = 0.7
    colour_sigma: float = 60.0  # RGB distance of the object's mean colour to the asked colour
    background_sigma: float = 50.0  # RGB distance of the border's median to the asked background
    position_sigma: float = 0.15  # centroid distance, fraction of the image side
    size_sigma: float = 0.5  # |log(area / expected area)|
    shape_sigma: float = 0.15 # |fill of the bounding box - the shape's fill|
    blur_tolerance: float = 1.2  # transition band width (pixels) that still counts as sharp
    blur_scale: float = 1.0  # band width beyond the tolerance that costs a factor e
    noise_scale: float = 8.0  # 90th percentile of |pixel - 3x3 median| that costs a factor e


def _kernel(error: float, sigma: float) -> float:
    return math.exp(-((error / sigma) ** 2))


def _measure(image: Image.Image, prompt: str, cfg: WorldRewardConfig) -> dict[str, float]:
    """All attribute and quality scores of one image against one prompt."""
    want = parse_prompt(prompt)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w, _ = rgb.shape
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(rgb - background, axis=-1)
    mask = distance > FOREGROUND_DISTANCE
    area = float(mask.sum())
    out = {"background": _kernel(float(np.linalg.norm(background - BACKGROUNDS[want.background])),
                                 cfg.background_sigma)}
    if area < 2:  # no object at all: every object attribute fails, and sharpness is moot
        out.update(colour=0.0, position=0.0, size=0.0, shape=0.0, sharpness=0.0)
    else:
        # Colour from the object's core (its most distinct half), so anti-aliased edges do not tint it.
        core = mask & (distance >= np.median(distance[mask]))
        colour = rgb[core].mean(axis=0)
        out["colour"] = _kernel(float(np.linalg.norm(colour - COLOURS[want.colour])), cfg.colour_sigma)
        contrast = max(float(np.linalg.norm(colour - background)), 1.0)
        t = distance / contrast  # 0 at the background colour, 1 at the object's colour
        # Coverage: the share of each pixel the object covers (anti-aliased edges count in part),
        # ignoring faint deviations so that mild noise does not add area.
        coverage = np.where(t > 0.25, np.clip(t, 0.0, 1.0), 0.0)
        area = float(coverage.sum())
        ys, xs = np.mgrid[0:h, 0:w]
        centroid = np.array([((xs + 0.5) * coverage).sum() / (area * w), ((ys + 0.5) * coverage).sum() / (area * h)])
        out["position"] = _kernel(float(np.linalg.norm(centroid - expected_centroid(want))), cfg.position_sigma)
        out["size"] = _kernel(abs(math.log(area / expected_area(want.shape, want.size, w))), cfg.size_sigma)
        # Sub-pixel bounding box: the object's extent along x is the sum over columns of the
        # column's largest coverage (and likewise along y).
        box = coverage.max(axis=0).sum() * coverage.max(axis=1).sum()
        out["shape"] = _kernel(area / box - FILL[want.shape], cfg.shape_sigma)
        # Sharpness: pixels between 15% and 85% of the way from background to object colour form
        # the edge band; a sharp edge has a band about one pixel wide along the perimeter.
        band = float(((t > 0.15) & (t < 0.85)).sum())
        width = band / (4.0 * math.sqrt(area))
        out["sharpness"] = math.exp(-max(0.0, width - cfg.blur_tolerance) / cfg.blur_scale)
    median = np.asarray(image.convert("RGB").filter(ImageFilter.MedianFilter(3)), dtype=np.float64)
    # The 90th percentile ignores the few pixels a median filter changes on a clean image (corners,
    # curved edges) but sees noise and speckles, which change most pixels.
    residual = np.abs(rgb - median).mean(axis=-1)
    out["cleanliness"] = math.exp(-float(np.percentile(residual, 90)) / cfg.noise_scale)
    out["fidelity"] = float(np.mean([out[k] for k in ("colour", "shape", "size", "position", "background")]))
    out["quality"] = out["sharpness"] * out["cleanliness"]
    out["reward"] = cfg.fidelity_weight * out["fidelity"] + (1 - cfg.fidelity_weight) * out["quality"]
    return out


class WorldScorer:
    """``scorer(images, prompts) -> Tensor[B]`` of rewards in [0, 1]; ``components`` gives each part."""

    name = "world"

    def __init__(self, config: WorldRewardConfig | None = None, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | str | None = None) -> None:
        from smpo.io import resolve_dtype

        self.config = config or WorldRewardConfig()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # Scores are measured in float64 on the CPU; ``device``/``dtype`` only place the result.
        self.dtype = resolve_dtype(dtype) if dtype is not None else torch.float32

    def components(self, images: list[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
        """Every measured score (colour, shape, size, position, background, fidelity, sharpness,
        cleanliness, quality, reward), each a ``Tensor[B]``."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        rows = []
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            try:
                rows.append(_measure(image, prompt, self.config))
            except ValueError as err:
                raise ValueError(f"world scorer, item {i}: {err}") from None
        keys = rows[0].keys() if rows else ("reward",)
        return {k: torch.tensor([r[k] for r in rows], dtype=self.dtype, device=self.device) for k in keys}

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        return self.components(images, prompts)["reward"]


def load_world_scorer(path: str | os.PathLike | None = None, device: torch.device | str | None = None,
                      dtype: torch.dtype | str | None = None, **overrides: float) -> WorldScorer:
    """The world's scorer. ``path`` (optional) is a JSON file of ``WorldRewardConfig`` fields;
    keyword ``overrides`` win over it. Registered in ``smpo.rewards`` as ``world``."""
    values: dict[str, float] = {}
    if path is not None:
        values.update(json.loads(open(path).read()))
    values.update(overrides)
    known = {f.name for f in fields(WorldRewardConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown world reward setting(s) {unknown} (from {path or 'keywords'}); "
                         f"choose from {sorted(known)}")
    return WorldScorer(WorldRewardConfig(**values), device=device, dtype=dtype)
