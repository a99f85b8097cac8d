"""An evaluated model as read back from disk: its per-image scores, its scorers and its images.

``smpo evaluate`` writes ``evaluation/scores.parquet`` (one row per image) and a record of the run
beside a generated folder; :func:`load_evaluated` reads either back as an :class:`EvaluatedModel`,
the one type that ``smpo compare`` (:mod:`smpo.evaluation.compare`) and its report
(:mod:`smpo.evaluation.report`) pass around.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from smpo.evaluation.evaluate import RECORD, SCORES
from smpo.io import read_json

_META_COLUMNS = ("file", "prompt_index", "image_index", "seed", "prompt", "category", "challenge")


@dataclass
class EvaluatedModel:
    """One model's per-image scores, its scorers, and where its images are."""

    name: str
    table: pd.DataFrame
    scorers: list[str]
    images: Path | None


def load_evaluated(path: str | os.PathLike, name: str | None = None) -> EvaluatedModel:
    """A generated folder (with ``evaluation/``), an evaluation folder, or a ``scores.parquet`` file."""
    path = Path(path)
    candidates = [path / "evaluation" / SCORES, path / SCORES, path]
    scores = next((c for c in candidates if c.is_file()), None)
    if scores is None:
        raise FileNotFoundError(f"{path}: no {SCORES} (run `smpo evaluate {path}` first)")
    record = scores.parent / RECORD
    info = read_json(record) if record.is_file() else {}
    table = pd.read_parquet(scores)
    scorers = info.get("scorer_order") or [c for c in table.columns if c not in _META_COLUMNS]
    source = Path(info["source"]) if "source" in info else None
    if name is None:
        folder = scores.parent
        name = folder.parent.name if folder.name == "evaluation" else folder.name
    return EvaluatedModel(name=name, table=table, scorers=scorers, images=source)
