"""Tiny scorers saved once per session, and small deterministic test images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from smpo.rewards import load_scorer
from smpo.rewards.testing import save_tiny_scorer


def _random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def random_image():
    """``random_image(width, height, seed)``: uniform random RGB noise."""
    return _random_image


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    """Five images of different sizes and aspect ratios (one grayscale, one RGBA)."""
    return [_random_image(48, 40, 0), _random_image(33, 70, 1), _random_image(32, 32, 2).convert("L"),
            _random_image(90, 37, 3).convert("RGBA"), _random_image(64, 64, 4)]


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return ["a red cat", "a photo of a dog", "", "the cat of the dog " * 20, "x"]


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """``tiny_folder(name)``: a tiny scorer folder, built once per name."""
    cache: dict = {}

    def make(name: str):
        if name not in cache:
            cache[name] = save_tiny_scorer(name, tmp_path_factory.mktemp(name.replace(".", "")))
        return cache[name]

    return make


@pytest.fixture(scope="session")
def tiny_scorer(tiny_folder):
    """``tiny_scorer(name)``: the tiny scorer loaded through ``load_scorer`` (batch size 2), cached."""
    cache: dict = {}

    def make(name: str):
        if name not in cache:
            cache[name] = load_scorer(name, path=tiny_folder(name), device="cpu", dtype="fp32", batch_size=2)
        return cache[name]

    return make
