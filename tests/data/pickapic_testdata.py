"""Builders of small Pick-a-Pic-schema data for the data tests (imported by conftest.py and the tests)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

CORRUPT_ROW = 4  # its jpg_1 is not an image
TIE_ROW = 7  # label_0 == 0.5
NUM_ROWS = 12
CORRUPT_BYTES = b"\xff\xd8\xff" + b"this is not a jpeg" * 8


def random_jpeg(seed: int, size: tuple[int, int] = (24, 20)) -> bytes:
    """A small JPEG of random colours (different for every seed)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def pickapic_rows(num_rows: int = NUM_ROWS, *, corrupt_row: int | None = CORRUPT_ROW,
                  tie_row: int | None = TIE_ROW) -> list[dict]:
    """Rows in the Pick-a-Pic v2 schema (a few of its other columns included), label_0 alternating 1/0."""
    rows = []
    for i in range(num_rows):
        rows.append({
            "ranking_id": 1000 + i,
            "user_id": 7 * i,
            "caption": f"a photo of object {i}",
            "jpg_0": random_jpeg(2 * i),
            "jpg_1": CORRUPT_BYTES if i == corrupt_row else random_jpeg(2 * i + 1, size=(20, 24)),
            "label_0": 0.5 if i == tie_row else float(i % 2 == 0),
            "label_1": 0.5 if i == tie_row else float(i % 2 == 1),
            "model_0": "model-a",
            "model_1": "model-b",
        })
    return rows


PICKAPIC_SCHEMA = pa.schema([
    ("ranking_id", pa.int64()), ("user_id", pa.int64()), ("caption", pa.string()), ("jpg_0", pa.binary()),
    ("jpg_1", pa.binary()), ("label_0", pa.float64()), ("label_1", pa.float64()), ("model_0", pa.string()),
    ("model_1", pa.string()),
])


def write_parquet(path: Path, rows: list[dict], *, row_group_size: int | None = None,
                  schema: pa.Schema | None = PICKAPIC_SCHEMA) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return path


