"""Preference pairs in the Pick-a-Pic v2 schema, read lazily from four kinds of source.

A pair is one prompt (``caption``), two images (``jpg_0``, ``jpg_1``: encoded image bytes) and the
human label ``label_0`` (1: image 0 preferred, 0: image 1 preferred, 0.5: a tie); every other column
of the source is kept. :func:`open_source` accepts

- a folder written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``: ``split`` picks one),
- a parquet file, or a folder of parquet files (searched recursively; when some file names start
  with ``{split}-`` or sit in a folder named ``split``, only those are read, so the Pick-a-Pic
  ``data/`` folder can be given as it is),
- a hub dataset id such as ``liuhuohuo2/pick-a-pic-v2`` (a copy of Pick-a-Pic v2), streamed with
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

The schema lives in :mod:`smpo.data.schema` and the sources in :mod:`smpo.data.sources`; this
module turns a source's tables into pairs.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from smpo.data.schema import HUMAN_LABELS, PreferencePair, ReadStats, SkippedPair
from smpo.data.sources import PairSource, open_source
from smpo.labels import is_tie

# ---------------------------------------------------------------------------------------------------
# Pairs from tables.


def decode_image(data: bytes) -> Image.Image:
    """Fully decode encoded image bytes into an RGB image (raises on corrupt or truncated data)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


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
        if is_tie(label):
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
