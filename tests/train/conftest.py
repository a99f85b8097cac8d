"""Shared fixtures of the training tests: tiny SD1.5- and SDXL-architecture pipelines saved locally
(random weights, 16 px), and a small labelled dataset in the `smpo label` output format."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from smpo.models.presets import save_pipeline


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {family: save_pipeline(root / family, family, "tiny") for family in ("sd15", "sdxl")}


def _jpeg(rng: np.random.Generator, size: tuple[int, int], base: tuple[int, int, int]) -> bytes:
    noise = rng.integers(-30, 30, size=(size[1], size[0], 3))
    pixels = np.clip(np.array(base)[None, None] + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    return out.getvalue()


def write_labelled_dataset(folder: Path, num_pairs: int = 8, *, seed: int = 0) -> Path:
    """``num_pairs`` pairs: a bright winner and a dark loser (20x24 px, so resizing and cropping
    run), human label and reward scores in the `smpo label` schema, in two parquet shards."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_pairs):
        bright = _jpeg(rng, (24, 20), (200, 180 - 10 * i, 60))
        dark = _jpeg(rng, (20, 24), (40, 60, 30 + 10 * i))
        winner_first = i % 2 == 0
        score_w, score_l = 0.25 + 0.01 * i, 0.15
        rows.append({
            "pair_id": f"p{i:03d}", "caption": f"a picture number {i}",
            "jpg_0": bright if winner_first else dark, "jpg_1": dark if winner_first else bright,
            "label_0": 1.0 if winner_first else 0.0,
            "score_0": score_w if winner_first else score_l, "score_1": score_l if winner_first else score_w,
            "winner": 0 if winner_first else 1,
            "p_win": float(1 / (1 + np.exp(-(score_w - score_l) / 0.2))),
        })
    half = (num_pairs + 1) // 2
    for k, chunk in enumerate((rows[:half], rows[half:])):
        if chunk:
            pq.write_table(pa.Table.from_pylist(chunk), folder / f"shard-{k:05d}.parquet")
    return folder


@pytest.fixture(scope="session")
def labelled(tmp_path_factory) -> Path:
    return write_labelled_dataset(tmp_path_factory.mktemp("labelled") / "data", 8)


@pytest.fixture(scope="session")
def write_labelled():
    """`write_labelled_dataset`, for a test that needs its own set."""
    return write_labelled_dataset
