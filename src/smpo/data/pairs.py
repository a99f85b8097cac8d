"""Preference pairs in the Pick-a-Pic v2 schema, read lazily from four kinds of source.

A pair is one prompt (``caption``), two images (``jpg_0``, ``jpg_1``: encoded image bytes) and the
human label ``label_0`` (1: image 0 preferred, 0: image 1 preferred, 0.5: a tie); every other column
of the source is kept. :func:`open_source` accepts

- a folder written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``: ``split`` picks one),
- a parquet file, or a folder of parquet files (searched recursively; when some file names start
  with ``{split}-`` or sit in a folder named ``split``, only those are read, so the Pick-a-Pic
  ``data/`` folder can be given as it is),
- a hub dataset id such as ``yuvalkirstain/pickapic_v2``, streamed with
  ``datasets.load_dataset(id, split=split, streaming=True)`` (nothing is downloaded up front: the
  full set is 335 GB),
- a JSONL file of ``{"prompt", "image_0", "image_1", "label_0"}`` records whose image fields are
  paths (relative to the JSONL file's folder, or absolute), for one's own data.

Everything is an iterator over arrow batches, never a list of the whole set. A pair whose image
cannot be read or decoded is skipped, counted and named in :class:`ReadStats`; a long job never
aborts for one bad file. A source that lacks a column fails at once with
:class:`MissingColumnsError`, naming the expected and the found columns.

Every pair gets a stable ``pair_id`` (a string): the source's ``pair_id`` column when it has one (a
labelled dataset relabelled), else its ``ranking_id`` (Pick-a-Pic), else the row index in the source.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
JSONL_FIELDS = ("prompt", "image_0", "image_1", "label_0")
HUMAN_LABELS = (0.0, 0.5, 1.0)
TIE = 0.5
ID_COLUMNS = ("pair_id", "ranking_id")  # first one present names the pairs; else the row index
DEFAULT_BATCH_ROWS = 64


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
        return self.label_0 == TIE


# ---------------------------------------------------------------------------------------------------
# Sources: each yields arrow tables of consecutive rows in the Pick-a-Pic schema.


class PairSource(ABC):
    """Rows of preference pairs as arrow tables.

    ``schema`` is the arrow schema of the rows; ``num_rows`` is ``None`` for a stream until one
    full pass has counted its rows. ``consumed`` names the columns that make up the pair itself;
    all other columns are kept as the pair's extra columns.
    """

    description: str
    schema: pa.Schema
    num_rows: int | None
    expected_rows: int | None = None  # a stream's announced length (progress bars only), if known
    caption_column = "caption"
    image_columns = ("jpg_0", "jpg_1")
    consumed: tuple[str, ...] = PICKAPIC_COLUMNS

    @abstractmethod
    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[pa.Table]:
        """Tables of consecutive rows ``start .. stop - 1`` (``stop=None``: to the end), in order."""

    def image_bytes(self, value: Any) -> bytes:
        """Encoded bytes of one image cell: raw bytes, or a ``datasets.Image`` struct."""
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return bytes(value["bytes"])
            if value.get("path"):
                return Path(value["path"]).read_bytes()
        raise ValueError(f"no image data in a cell of type {type(value).__name__}")

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    @property
    def id_column(self) -> str | None:
        return next((name for name in ID_COLUMNS if name in self.schema.names), None)

    @property
    def extra_columns(self) -> list[str]:
        return [name for name in self.schema.names if name not in self.consumed]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r}, num_rows={self.num_rows})"


def _slice_batches(tables: Iterator[pa.Table], start: int, stop: int | None) -> Iterator[pa.Table]:
    """Cut a stream of tables (row 0 first) down to rows ``start .. stop - 1``."""
    offset = 0
    for table in tables:
        lo, hi = max(start - offset, 0), table.num_rows if stop is None else min(stop - offset, table.num_rows)
        offset += table.num_rows
        if hi > lo:
            yield table.slice(lo, hi - lo)
        if stop is not None and offset >= stop:
            return


class DiskDatasetSource(PairSource):
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (memory-mapped)."""

    def __init__(self, path: Path, *, split: str = "train", limit: int | None = None,
                 batch_rows: int = DEFAULT_BATCH_ROWS) -> None:
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise KeyError(f"{path} has splits {', '.join(loaded)}; there is no split {split!r} (option --split)")
            loaded = loaded[split]
        self.dataset = loaded.with_format("arrow")
        self.description = str(path)
        self.schema = loaded.features.arrow_schema
        self.num_rows = len(loaded) if limit is None else min(limit, len(loaded))
        self.batch_rows = batch_rows
        check_columns(self.columns, PICKAPIC_COLUMNS, f"dataset folder {path}")

    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[pa.Table]:
        stop = self.num_rows if stop is None else min(stop, self.num_rows)
        for lo in range(start, stop, self.batch_rows):
            yield self.dataset[lo : min(lo + self.batch_rows, stop)]


def parquet_files(path: Path, split: str = "train") -> list[Path]:
    """The parquet files of ``path`` (a file, or a folder searched recursively), for ``split``.

    Hidden files and folders are ignored. When some files are named ``{split}-*`` or sit in a folder
    named ``split``, only those are returned (Pick-a-Pic keeps train, test and validation side by side).
    """
    if path.is_file():
        return [path]
    files = sorted(
        p for p in path.rglob("*.parquet")
        if not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    in_split = [p for p in files if p.name.startswith(f"{split}-") or split in p.relative_to(path).parts[:-1]]
    return in_split or files


class ParquetSource(PairSource):
    """One parquet file or a folder of them; rows are read one row group at a time."""

    def __init__(self, path: Path, *, split: str = "train", limit: int | None = None) -> None:
        self.files = parquet_files(path, split)
        if not self.files:
            raise FileNotFoundError(f"no parquet file under {path}")
        metas = [pq.read_metadata(f) for f in self.files]
        self.schema = pa.unify_schemas([pq.read_schema(f) for f in self.files])
        self.file_rows = [m.num_rows for m in metas]
        total = sum(self.file_rows)
        self.num_rows = total if limit is None else min(limit, total)
        self.description = str(path)
        check_columns(self.columns, PICKAPIC_COLUMNS, f"parquet {path}")

    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[pa.Table]:
        stop = self.num_rows if stop is None else min(stop, self.num_rows)
        offset = 0
        for file, rows in zip(self.files, self.file_rows):
            if offset >= stop:
                return
            if offset + rows > start:
                yield from self._file_batches(file, offset, start, stop)
            offset += rows

    def _file_batches(self, file: Path, offset: int, start: int, stop: int) -> Iterator[pa.Table]:
        handle = pq.ParquetFile(file)
        for group in range(handle.num_row_groups):
            rows = handle.metadata.row_group(group).num_rows
            lo, hi = max(start - offset, 0), min(stop - offset, rows)
            if hi > lo:
                table = handle.read_row_group(group).slice(lo, hi - lo)
                yield table if table.schema == self.schema else table.cast(self.schema)
            offset += rows
            if offset >= stop:
                return


class HubSource(PairSource):
    """A hub dataset streamed with ``datasets.load_dataset(name, split=split, streaming=True)``.

    Row ``start`` is reached by reading through the stream (``IterableDataset.skip``); the number of
    rows is known only after one full pass.
    """

    def __init__(self, name: str, *, split: str = "train", limit: int | None = None,
                 batch_rows: int = DEFAULT_BATCH_ROWS) -> None:
        import datasets

        stream = datasets.load_dataset(name, split=split, streaming=True)
        if limit is not None:
            stream = stream.take(limit)
        self.stream = stream
        self.description = f"{name} (hub, split {split}, streamed)"
        self.num_rows = None
        self.batch_rows = batch_rows
        announced = getattr(getattr(stream, "info", None), "splits", None) or {}
        if split in announced and announced[split].num_examples:
            self.expected_rows = announced[split].num_examples if limit is None else min(limit, announced[split].num_examples)
        features = stream.features
        if features is None:  # some hub sets declare none: read them off the first batch
            first = next(stream.with_format("arrow").iter(batch_size=1))
            self.schema = first.schema
        else:
            self.schema = features.arrow_schema
        check_columns(self.columns, PICKAPIC_COLUMNS, f"hub dataset {name}")

    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[pa.Table]:
        stream = self.stream.skip(start) if start else self.stream
        if stop is not None:
            stream = stream.take(stop - start)
        for table in stream.with_format("arrow").iter(batch_size=self.batch_rows):
            yield table.cast(self.schema) if table.schema != self.schema else table


class JsonlSource(PairSource):
    """``{"prompt", "image_0", "image_1", "label_0", ...}`` records; image fields are file paths.

    Paths are relative to the JSONL file's folder (or absolute). The image paths stay in the output
    as the extra columns ``image_0``/``image_1``; the images' bytes become ``jpg_0``/``jpg_1``.
    """

    caption_column = "prompt"
    image_columns = ("image_0", "image_1")
    consumed = ("prompt", "label_0")

    def __init__(self, path: Path, *, limit: int | None = None) -> None:
        self.root = path.parent
        self.description = str(path)
        records = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({error})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
                check_columns(list(record), JSONL_FIELDS, f"{path}, line {number},")
                try:
                    record["label_0"] = float(record["label_0"])
                except (TypeError, ValueError):
                    raise ValueError(f"{path}, line {number}: label_0 is {record['label_0']!r}; "
                                     "expected 0, 0.5 or 1") from None
                records.append(record)
                if limit is not None and len(records) >= limit:
                    break
        keys = list(dict.fromkeys(key for record in records for key in record))  # every key, first-seen order
        self.table = pa.table({key: [record.get(key) for record in records] for key in keys})
        if not records:
            self.table = pa.table({"prompt": pa.array([], pa.string()), "image_0": pa.array([], pa.string()),
                                   "image_1": pa.array([], pa.string()), "label_0": pa.array([], pa.float64())})
        self.schema = self.table.schema
        self.num_rows = self.table.num_rows

    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[pa.Table]:
        stop = self.num_rows if stop is None else min(stop, self.num_rows)
        for lo in range(start, stop, DEFAULT_BATCH_ROWS):
            yield self.table.slice(lo, min(DEFAULT_BATCH_ROWS, stop - lo))

    def image_bytes(self, value: Any) -> bytes:
        if not isinstance(value, str):
            return super().image_bytes(value)
        file = Path(value) if os.path.isabs(value) else self.root / value
        try:
            return file.read_bytes()
        except OSError as error:
            raise OSError(f"cannot read {file}: {error.strerror or error}") from None


def open_source(source: str | os.PathLike | PairSource, *, split: str = "train",
                limit: int | None = None) -> PairSource:
    """Open ``source`` (see the module docstring for the four kinds); ``limit`` caps the rows read."""
    if isinstance(source, PairSource):
        return source
    path = Path(source)
    if path.suffix == ".jsonl" and path.is_file():
        return JsonlSource(path, limit=limit)
    if path.is_file() and path.suffix == ".parquet":
        return ParquetSource(path, split=split, limit=limit)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return DiskDatasetSource(path, split=split, limit=limit)
        return ParquetSource(path, split=split, limit=limit)
    if path.exists():
        raise ValueError(f"cannot read {path}: expected a .parquet or .jsonl file, or a folder")
    name = str(source)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return HubSource(name, split=split, limit=limit)
    raise FileNotFoundError(f"{name} does not exist (and is not a hub dataset id of the form owner/name)")


# ---------------------------------------------------------------------------------------------------
# Pairs from tables.


def decode_image(data: bytes) -> Image.Image:
    """Fully decode encoded image bytes into an RGB image (raises on corrupt or truncated data)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def _label_problem(label: Any) -> str | None:
    if label is None or (isinstance(label, float) and math.isnan(label)):
        return "label_0 is missing"
    if float(label) not in HUMAN_LABELS:
        return f"label_0 is {label}; expected 0, 0.5 or 1"
    return None


def pairs_in_table(source: PairSource, table: pa.Table, first_row: int, *, keep_ties: bool = False,
                   decode: bool = True, extras: bool = True, stats: ReadStats | None = None
                   ) -> Iterator[PreferencePair]:
    """The pairs of ``table``, whose first row is row ``first_row`` of ``source``.

    Human ties are counted and yielded only with ``keep_ties``; a pair with an unreadable image (or
    an invalid label) is counted and named in ``stats.skipped`` instead of being yielded.
    """
    stats = stats if stats is not None else ReadStats()
    image_0, image_1 = source.image_columns
    columns = table.select([source.caption_column, image_0, image_1, "label_0"]).to_pydict()
    ids = table.column(source.id_column).to_pylist() if source.id_column else None
    extra_names = source.extra_columns if extras else []
    extra_values = table.select(extra_names).to_pydict() if extra_names else {}
    for i in range(table.num_rows):
        row = first_row + i
        pair_id = str(ids[i]) if ids is not None else str(row)
        stats.rows += 1
        label = columns["label_0"][i]
        problem = _label_problem(label)
        if problem is not None:
            stats.skipped.append(SkippedPair(pair_id, row, problem))
            continue
        if float(label) == TIE:
            stats.ties += 1
            if not keep_ties:
                continue
        try:
            data = [source.image_bytes(columns[image_0][i]), source.image_bytes(columns[image_1][i])]
        except (OSError, ValueError) as error:
            stats.skipped.append(SkippedPair(pair_id, row, str(error)))
            continue
        decoded: list[Image.Image | None] = [None, None]
        if decode:
            try:
                decoded = [_decode_named(data[side], _image_name(source, columns, side, i)) for side in (0, 1)]
            except ValueError as error:
                stats.skipped.append(SkippedPair(pair_id, row, str(error)))
                continue
        stats.pairs += 1
        yield PreferencePair(
            pair_id=pair_id, row=row, caption=columns[source.caption_column][i] or "",
            jpg_0=data[0], jpg_1=data[1], label_0=float(label), image_0=decoded[0], image_1=decoded[1],
            extra={name: values[i] for name, values in extra_values.items()},
        )


def _image_name(source: PairSource, columns: dict[str, list], side: int, i: int) -> str:
    """``jpg_0``, or ``image_0 (path)`` for a source whose image cells are file paths."""
    column = source.image_columns[side]
    value = columns[column][i]
    return f"{column} ({value})" if isinstance(value, str) else column


def _decode_named(data: bytes, where: str) -> Image.Image:
    try:
        return decode_image(data)
    except UnidentifiedImageError:
        raise ValueError(f"cannot decode {where}: not an image in a format PIL reads ({len(data)} bytes)") from None
    except Exception as error:  # any decoder failure skips the pair; a long job never aborts on one file
        message = re.sub(r" at 0x[0-9a-fA-F]+", "", str(error))  # no memory addresses: reruns give the same text
        raise ValueError(f"cannot decode {where}: {type(error).__name__}: {message}") from None


def iter_shards(source: PairSource, shard_size: int,
                wanted: Callable[[int], bool] = lambda k: True) -> Iterator[tuple[int, int, pa.Table]]:
    """``(k, first_row, table)`` for each shard ``k`` (rows ``k * shard_size`` onwards) that is ``wanted``.

    A source of known length is read shard by shard (random access). A stream is read once from the
    start, cut into shards, and the shards not wanted are dropped; once the stream ends,
    ``source.num_rows`` holds its length.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    if source.num_rows is not None:
        for k in range(math.ceil(source.num_rows / shard_size)):
            if wanted(k):
                start = k * shard_size
                tables = list(source.batches(start, min(start + shard_size, source.num_rows)))
                yield k, start, _concat(tables, source.schema)
        return
    pending: list[pa.Table] = []
    pending_rows, k, total = 0, 0, 0
    for table in source.batches():
        total += table.num_rows
        pending.append(table)
        pending_rows += table.num_rows
        while pending_rows >= shard_size:
            whole = _concat(pending, source.schema)
            if wanted(k):
                yield k, k * shard_size, whole.slice(0, shard_size)
            pending, pending_rows, k = [whole.slice(shard_size)], pending_rows - shard_size, k + 1
    if pending_rows and wanted(k):
        yield k, k * shard_size, _concat(pending, source.schema)
    source.num_rows = total


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables(tables) if tables else schema.empty_table()


def iter_pairs(source: str | os.PathLike | PairSource, *, split: str = "train", keep_ties: bool = False,
               decode: bool = True, limit: int | None = None, stats: ReadStats | None = None
               ) -> Iterator[PreferencePair]:
    """Every pair of ``source``, in order, as :class:`PreferencePair` (see :func:`open_source`).

    Pass a :class:`ReadStats` to learn, as the pass goes, how many rows were read, how many ties were
    dropped and which pairs were skipped.
    """
    opened = open_source(source, split=split, limit=limit)
    stats = stats if stats is not None else ReadStats()
    row = 0
    for table in opened.batches():
        yield from pairs_in_table(opened, table, row, keep_ties=keep_ties, decode=decode, stats=stats)
        row += table.num_rows
