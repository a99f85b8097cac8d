"""The manifest of a generated folder: one JSON line per image, the contract between generate,
evaluate and compare.

A generated folder holds ``images/PPPPP_II.png`` (prompt index, image index), ``manifest.jsonl``
and ``generation.json`` (the settings). Each manifest line names the file, the prompt (its index in
the full prompt set, its text, category and challenge), the image index and the seed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from smpo.io import atomic_path

MANIFEST = "manifest.jsonl"
SETTINGS = "generation.json"
KEY_COLUMNS = ("prompt_index", "image_index")


@dataclass(frozen=True)
class ImageRecord:
    """One generated image."""

    file: str  # relative to the generated folder
    prompt_index: int
    image_index: int
    seed: int
    prompt: str
    category: str | None = None
    challenge: str | None = None


def image_file(prompt_index: int, image_index: int) -> str:
    """Where image ``image_index`` of prompt ``prompt_index`` lives inside a generated folder."""
    return f"images/{prompt_index:05d}_{image_index:02d}.png"


def read_manifest(folder: str | os.PathLike) -> list[ImageRecord]:
    """The records of ``folder/manifest.jsonl``; errors name the line."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {folder} an `smpo generate` output folder?")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(ImageRecord(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path}, line {number}: not a manifest record ({e})") from None
    return records


def write_manifest(folder: str | os.PathLike, records: list[ImageRecord]) -> Path:
    """Write ``records`` sorted by (prompt index, image index), atomically."""
    path = Path(folder) / MANIFEST
    ordered = sorted(records, key=lambda r: (r.prompt_index, r.image_index))
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in ordered), encoding="utf-8")
    return path
