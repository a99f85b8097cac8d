"""Phase 1 of ``smpo label`` (:mod:`smpo.data.label` tells the whole protocol): score the source's
shards, each written whole or not at all as ``.work/shard-KKKKK/`` (``scored.parquet``, the rows in
the output layout without ``winner``/``p_win``, and ``stats.json``, what was read and the shard's
score range). Process ``rank`` of ``world`` takes shards ``rank, rank + world, ...``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm.auto import tqdm

from smpo.data.pairs import iter_shards, pairs_in_table
from smpo.data.schema import PreferencePair, ReadStats
from smpo.data.sources import PairSource
from smpo.io import atomic_path, write_json

PAIR_COLUMNS = ("pair_id", "caption", "jpg_0", "jpg_1", "label_0", "score_0", "score_1")
LABEL_COLUMNS = ("winner", "p_win")
OUTPUT_COLUMNS = PAIR_COLUMNS + LABEL_COLUMNS

ScoreFn = Callable[[Sequence[Image.Image], Sequence[str]], torch.Tensor]

_PAIR_SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
    ("label_0", pa.float64()), ("score_0", pa.float64()), ("score_1", pa.float64()),
])


@dataclass(frozen=True)
class RunSettings:
    """Everything that fixes the bytes of the scored shards; a resumed run must repeat them."""

    source: str
    split: str
    scorer: str
    scorer_path: str | None
    shard_size: int
    batch_size: int
    keep_ties: bool
    limit: int | None
    dtype: str



def shard_dir(work: Path, k: int) -> Path:
    return work / f"shard-{k:05d}"


def extra_columns(source: PairSource) -> list[str]:
    """The source's columns carried into the output unchanged (all but those the output recomputes)."""
    return [name for name in source.extra_columns if name not in OUTPUT_COLUMNS]


def score_shards(source: PairSource, work: Path, score_fn: ScoreFn, settings: RunSettings, *,
                 rank: int = 0, world: int = 1, progress: bool = True) -> None:
    """Score the shards ``rank, rank + world, ...`` of ``source`` not yet in ``work``."""
    def wanted(k: int) -> bool:
        return k % world == rank and not shard_dir(work, k).is_dir()

    size, n = settings.shard_size, source.num_rows or source.expected_rows
    todo = None if n is None else sum(min(size, n - k * size) for k in range(math.ceil(n / size)) if wanted(k))
    with tqdm(total=todo, unit="pair", desc="smpo label", disable=not progress, smoothing=0.1) as bar:
        for k, first_row, table in iter_shards(source, settings.shard_size, wanted):
            scored, stats = score_table(source, table, first_row, score_fn, batch_size=settings.batch_size,
                                        keep_ties=settings.keep_ties, on_rows=bar.update)
            _write_work_shard(shard_dir(work, k), scored, stats)
    if source.num_rows is not None:  # a stream knows its length only now
        write_json(work / "source.json", {"num_rows": source.num_rows})


def score_table(source: PairSource, table: pa.Table, first_row: int, score_fn: ScoreFn, *, batch_size: int,
                keep_ties: bool, on_rows: Callable[[int], Any] = lambda n: None) -> tuple[pa.Table, ReadStats]:
    """Score the pairs of one shard in batches of ``batch_size`` pairs (``2 * batch_size`` images).

    Returns the shard's rows in the output layout without ``winner``/``p_win``, and what was read.
    """
    stats = ReadStats()
    columns: dict[str, list] = {name: [] for name in PAIR_COLUMNS}
    kept: list[int] = []
    batch: list[PreferencePair] = []
    reported = 0

    def flush() -> None:
        nonlocal reported
        if batch:
            scores = score_pairs(score_fn, batch)
            for pair, (score_0, score_1) in zip(batch, scores.tolist()):
                for name, value in (("pair_id", pair.pair_id), ("caption", pair.caption), ("jpg_0", pair.jpg_0),
                                    ("jpg_1", pair.jpg_1), ("label_0", pair.label_0), ("score_0", score_0),
                                    ("score_1", score_1)):
                    columns[name].append(value)
                kept.append(pair.row - first_row)
            batch.clear()
        on_rows(stats.rows - reported)
        reported = stats.rows

    for pair in pairs_in_table(source, table, first_row, keep_ties=keep_ties, extras=False, stats=stats):
        batch.append(pair)
        if len(batch) == batch_size:
            flush()
    flush()
    scored = pa.Table.from_pydict(columns, schema=_PAIR_SCHEMA)
    extras = table.select(extra_columns(source)).take(pa.array(kept, pa.int64()))
    for name in extras.column_names:
        scored = scored.append_column(extras.schema.field(name), extras.column(name))
    return scored, stats


def score_pairs(score_fn: ScoreFn, pairs: Sequence[PreferencePair]) -> torch.Tensor:
    """Scores ``[B, 2]`` (float64) of both images of each pair, in one scorer call."""
    images = [p.image_0 for p in pairs] + [p.image_1 for p in pairs]
    prompts = [p.caption for p in pairs] * 2
    with torch.inference_mode():
        scores = torch.as_tensor(score_fn(images, prompts)).detach().cpu().to(torch.float64).reshape(-1)
    if scores.numel() != len(images):
        raise ValueError(f"the scorer returned {scores.numel()} scores for {len(images)} images")
    return torch.stack([scores[: len(pairs)], scores[len(pairs):]], dim=1)


def _write_work_shard(folder: Path, scored: pa.Table, stats: ReadStats) -> None:
    """Write one scored shard and its counts as one folder, atomically (it exists whole or not at all)."""
    scores = np.concatenate([scored.column("score_0").to_numpy(), scored.column("score_1").to_numpy()])
    record = stats.to_dict()
    record["score_min"] = float(scores.min()) if scores.size else None
    record["score_max"] = float(scores.max()) if scores.size else None
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        pq.write_table(scored, tmp / "scored.parquet")
        write_json(tmp / "stats.json", record)
