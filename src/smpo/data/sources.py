"""Where preference pairs come from: four kinds of source, each yielding arrow tables of rows in the
Pick-a-Pic schema (:mod:`smpo.data.schema`); :func:`open_source` picks one for a path or hub id.
See :mod:`smpo.data.pairs` for the kinds and the reading rules.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from smpo.data.schema import (
    DEFAULT_BATCH_ROWS,
    ID_COLUMNS,
    JSONL_FIELDS,
    PICKAPIC_COLUMNS,
    check_columns,
)


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
