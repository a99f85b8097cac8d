"""The Pick-a-Pic v2 schema of a preference pair: its columns, the records a reader yields and counts.

A pair is one prompt (``caption``), two images (``jpg_0``, ``jpg_1``: encoded image bytes) and the
human label ``label_0`` (1: image 0 preferred, 0: image 1 preferred, 0.5: a tie). The sources
(:mod:`smpo.data.sources`) and the reader (:mod:`smpo.data.pairs`) share these definitions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

from smpo.labels import TIE, is_tie

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
JSONL_FIELDS = ("prompt", "image_0", "image_1", "label_0")
HUMAN_LABELS = (0.0, TIE, 1.0)
ID_COLUMNS = ("pair_id", "ranking_id")  # first one present names the pairs; else the row index
DEFAULT_BATCH_ROWS = 64
ROW_GROUP_PAIRS = 64
"""Pairs per parquet row group in the sets smpo writes (label, pairs): training reads a pair's images by
reading its row group, so a small group keeps random access cheap at any size of set."""


class MissingColumnsError(ValueError):
    """A source lacks columns of the Pick-a-Pic schema (or fields of the JSONL format)."""


def check_columns(found: list[str], expected: tuple[str, ...], where: str) -> None:
    """Raise :class:`MissingColumnsError` naming what is missing, what is expected and what is there."""
    missing = [name for name in expected if name not in found]
    if missing:
        raise MissingColumnsError(
            f"{where} lacks column(s) {', '.join(repr(m) for m in missing)}; "
            f"expected: {', '.join(expected)}; found: {', '.join(found) or '(none)'}"
        )


@dataclass(frozen=True)
class SkippedPair:
    """A pair left out because an image could not be read or decoded (or its label is invalid)."""

    pair_id: str
    row: int
    reason: str

    def __str__(self) -> str:
        return f"pair {self.pair_id} (row {self.row}): {self.reason}"


@dataclass
class ReadStats:
    """What a pass over a source saw: rows read, pairs yielded, human ties, skipped pairs."""

    rows: int = 0
    pairs: int = 0
    ties: int = 0  # human ties seen (yielded only with keep_ties)
    skipped: list[SkippedPair] = field(default_factory=list)

    def update(self, other: ReadStats) -> None:
        self.rows += other.rows
        self.pairs += other.pairs
        self.ties += other.ties
        self.skipped.extend(other.skipped)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "pairs": self.pairs, "ties": self.ties,
                "skipped": [asdict(s) for s in self.skipped]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReadStats:
        return cls(rows=data["rows"], pairs=data["pairs"], ties=data["ties"],
                   skipped=[SkippedPair(**s) for s in data["skipped"]])


@dataclass(frozen=True)
class PreferencePair:
    """One pair: the caption, both images (encoded bytes, and decoded RGB when asked) and the label."""

    pair_id: str
    row: int  # index of the pair in its source
    caption: str
    jpg_0: bytes
    jpg_1: bytes
    label_0: float
    image_0: Image.Image | None = None
    image_1: Image.Image | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # the source's other columns

    @property
    def is_tie(self) -> bool:
        return is_tie(self.label_0)
