"""The miniature world's renderer: a prompt -> a small RGB image that matches it, with random variation.

Shapes are drawn at ``SUPERSAMPLE`` times the final size and shrunk with a box filter, so edges
are anti-aliased but sharp (one pixel of transition). The variation (``Variation``) moves the
object a little, scales it, and jitters the colours, so two renders of one prompt differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from smpo.world.grammar import BACKGROUNDS, COLOURS, POSITIONS, Attributes, parse_prompt

RESOLUTION = 32
SUPERSAMPLE = 4
# Half-extent of the object's bounding box, as a fraction of the image side.
HALF_EXTENT: dict[str, float] = {"small": 0.13, "large": 0.21}
# Share of the bounding box that each shape fills: circle pi/4, square 1, triangle 1/2.
FILL: dict[str, float] = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}


@dataclass(frozen=True)
class Variation:
    """How much two renders of one prompt differ (all uniform, +- the value)."""

    shift: float = 0.05  # object centre, fraction of the side
    scale: float = 0.12  # relative size noise
    colour: int = 12  # per channel, object colour
    background: int = 6  # per channel, background colour


def expected_area(shape: str, size: str, resolution: int = RESOLUTION) -> float:
    """Area in pixels of a ``shape`` of ``size`` without size noise (the scorer's reference)."""
    side = 2 * HALF_EXTENT[size] * resolution
    return FILL[shape] * side * side


def expected_centroid(attributes: Attributes) -> tuple[float, float]:
    """Centre of mass (x, y as fractions of the side) of an unshifted object: a triangle's sits a
    third of its half-height below its bounding box's centre."""
    fx, fy = POSITIONS[attributes.position][1]
    if attributes.shape == "triangle":
        fy += HALF_EXTENT[attributes.size] / 3
    return fx, fy


def _jitter(rgb: tuple[int, int, int], amount: int, rng: np.random.Generator) -> tuple[int, int, int]:
    noisy = np.asarray(rgb) + rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(noisy, 0, 255))


def render(prompt: str | Attributes, *, rng: np.random.Generator | int | None = None,
           resolution: int = RESOLUTION, variation: Variation = Variation()) -> Image.Image:
    """Draw an RGB image of ``resolution`` pixels square that matches ``prompt``."""
    attributes = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    big = resolution * SUPERSAMPLE
    image = Image.new("RGB", (big, big), _jitter(BACKGROUNDS[attributes.background], variation.background, rng))
    draw = ImageDraw.Draw(image)
    fx, fy = POSITIONS[attributes.position][1]
    cx = (fx + rng.uniform(-variation.shift, variation.shift)) * big
    cy = (fy + rng.uniform(-variation.shift, variation.shift)) * big
    h = HALF_EXTENT[attributes.size] * big * (1 + rng.uniform(-variation.scale, variation.scale))
    fill = _jitter(COLOURS[attributes.colour], variation.colour, rng)
    if attributes.shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif attributes.shape == "square":
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:  # triangle pointing up, inside the same bounding box
        draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
    return image.resize((resolution, resolution), Image.Resampling.BOX)


def render_batch(prompts: list[str], *, seed: int = 0, resolution: int = RESOLUTION) -> list[Image.Image]:
    """One render per prompt from one seeded generator (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    return [render(p, rng=rng, resolution=resolution) for p in prompts]
