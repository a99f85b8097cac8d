"""``smpo label``: score every preference pair with a reward model and write smoothed labels.

ALGORITHM.md section 2 (SmPO Sec. 4.1, Eq. 11): a reward model scores both images of each pair;
the higher-scored image is the winner, and its probability of winning is

    p_win = sigmoid(s~_w - s~_l),  s~ = (s - min S) / (max S - min S),

with ``min S``/``max S`` taken over every score of the scored data (or given by ``--score-min`` /
``--score-max``). The output is a NEW folder of parquet shards plus ``labels.json`` (see
docs/ARCHITECTURE.md and docs/data.md for the columns).

The job runs in two phases so that a kill at any moment followed by the same command gives the
same bytes as an uninterrupted run:

1. Scoring. Source rows are cut into shards of ``shard_size`` rows; process ``i`` of ``world``
   (``smpo.processes.process_state``) scores shards ``i, i + world, ...`` in batches and writes each
   one as ``.work/shard-KKKKK/`` (scores, no ``p_win`` yet), atomically: a shard folder is there
   whole or not at all, and a rerun skips the shards that are there.
   (:mod:`smpo.data.scoring`.)
2. Finalisation (main process, after every shard is scored). The score range is fixed once from
   the shards' minima and maxima and recorded in ``.work/finalise.json``; each scored shard is
   turned into ``train-KKKKK-of-NNNNN.parquet`` with ``winner`` and ``p_win`` (a pure function of
   the shard and the range), then ``labels.json`` is written last: its presence marks a finished
   output.
"""

from __future__ import annotations

import argparse
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from smpo.data.schema import ROW_GROUP_PAIRS, ReadStats
from smpo.data.scoring import RunSettings, ScoreFn, score_shards, shard_dir
from smpo.data.sources import PairSource, open_source
from smpo.io import atomic_path, prepare_job_output, read_json, write_json
from smpo.labels import human_winner

LABELS_FILE = "labels.json"
WORK_DIR = ".work"
FORMAT = "smpo-labels/1"
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
DEFAULT_SHARD_SIZE = 1000
DEFAULT_BATCH_SIZE = 16


class LabelError(ValueError):
    """A labelling run cannot go on as asked (nothing to label, a changed score range, missing shards)."""


@dataclass
class LabelSummary:
    """The end-of-job summary, printed and saved (with the metadata) in ``labels.json``."""

    output: str
    scorer: str
    source: str
    rows: int  # source rows read
    pairs: int  # pairs written
    ties: int  # human ties seen (label_0 == 0.5)
    ties_kept: bool
    skipped: list[dict[str, Any]]  # {pair_id, row, reason} per pair left out
    score_min: float
    score_max: float
    score_range_from: str  # "data" or "override"
    p_win_quantiles: dict[str, float]
    agreement: float | None  # share of pairs with a human winner where the reward model picks it
    agreement_pairs: int
    duplicate_pair_ids: int = 0
    shards: list[str] = field(default_factory=list)

    def format(self, max_skipped: int = 20) -> str:
        """A few human-readable lines."""
        ties = f"{self.ties} human ties {'kept' if self.ties_kept else 'dropped'}"
        lines = [
            f"labelled {self.pairs} pairs from {self.rows} rows of {self.source} with {self.scorer} -> {self.output}",
            f"  skipped: {len(self.skipped)}; {ties}",
            f"  score range ({self.score_range_from}): [{self.score_min:.6g}, {self.score_max:.6g}]",
            "  p_win quantiles: " + ", ".join(f"q{k}={v:.4f}" for k, v in self.p_win_quantiles.items()),
        ]
        if self.agreement is not None:
            lines.append(f"  reward model agrees with the human label on {self.agreement:.1%} "
                         f"of {self.agreement_pairs} decided pairs")
        if self.duplicate_pair_ids:
            lines.append(f"  warning: {self.duplicate_pair_ids} pair ids occur more than once")
        for skipped in self.skipped[:max_skipped]:
            lines.append(f"  skipped pair {skipped['pair_id']} (row {skipped['row']}): {skipped['reason']}")
        if len(self.skipped) > max_skipped:
            lines.append(f"  ... and {len(self.skipped) - max_skipped} more skipped pairs (all listed in {LABELS_FILE})")
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelSummary:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


# ---------------------------------------------------------------------------------------------------
# Public API.


def label_pairs(
    source: str | Path | PairSource,
    output: str | Path,
    *,
    scorer: str | ScoreFn = "pickscore",
    scorer_path: str | Path | None = None,
    split: str = "train",
    keep_ties: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    score_min: float | None = None,
    score_max: float | None = None,
    limit: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> LabelSummary:
    """Score the pairs of ``source`` and write a labelled dataset to ``output`` (ALGORITHM.md section 2).

    ``scorer`` is a name for :func:`smpo.rewards.load_scorer` (loaded from ``scorer_path`` when
    given) or a ready callable ``(images, prompts) -> Tensor[B]``. ``score_min``/``score_max``
    replace the score range computed over the scored data. An unfinished run in ``output`` with the
    same settings is resumed; a finished or foreign ``output`` is refused unless ``overwrite``.
    Runs on every process of an ``accelerate launch``; returns the same summary on each.
    """
    from smpo.io import resolve_device, resolve_dtype
    from smpo.processes import process_state, wait_until

    state = process_state()
    out = Path(output)
    run_device = resolve_device(device) if device is not None else state.device
    run_dtype = resolve_dtype(dtype, run_device)
    scorer_name = scorer if isinstance(scorer, str) else (
        getattr(scorer, "name", None) or getattr(scorer, "__name__", None) or type(scorer).__name__)
    settings = RunSettings(
        source=str(getattr(source, "description", source)), split=split, scorer=scorer_name,
        scorer_path=None if scorer_path is None else str(scorer_path), shard_size=shard_size,
        batch_size=batch_size, keep_ties=keep_ties, limit=limit, dtype=str(run_dtype).removeprefix("torch."),
    )
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be at least 1; got {shard_size} and {batch_size}")
    if state.is_main_process:
        prepare_job_output(out, asdict(settings), job="smpo label", finished=LABELS_FILE, kind="labelled dataset",
                           work_dir=WORK_DIR,
                           overwrite=overwrite)
    state.wait_for_everyone()
    work = out / WORK_DIR
    if not (work / "finalise.json").exists():
        pair_source = open_source(source, split=split, limit=limit)
        score_fn = scorer if not isinstance(scorer, str) else _load_scorer(
            scorer, scorer_path, device=run_device, dtype=run_dtype, batch_size=2 * batch_size)
        score_shards(pair_source, work, score_fn, settings, rank=state.process_index,
                     world=state.num_processes, progress=progress and state.is_local_main_process)
    # No collective barrier here: processes may finish hours apart (a resumed run), longer than a
    # process group's timeout. The main process waits for the other processes' shards on disk.
    if not state.is_main_process:
        wait_until(lambda: (out / LABELS_FILE).exists(), f"{out / LABELS_FILE} (written by the main process)",
                   "smpo label")
        return LabelSummary.from_dict(read_json(out / LABELS_FILE))
    if state.num_processes > 1:
        wait_until(lambda: _all_scored(work, shard_size), "the other processes' shards", "smpo label")
    return finalise(out, score_min=score_min, score_max=score_max)


def _all_scored(work: Path, shard_size: int) -> bool:
    if (work / "finalise.json").exists():
        return True
    if not (work / "source.json").exists():
        return False
    n = math.ceil(read_json(work / "source.json")["num_rows"] / shard_size)
    return all(shard_dir(work, k).is_dir() for k in range(n))


def labelled_shards(folder: str | Path) -> list[Path]:
    """The parquet shards of a finished labelled dataset, in order."""
    folder = Path(folder)
    if not (folder / LABELS_FILE).exists():
        raise FileNotFoundError(f"{folder} is not a finished labelled dataset (no {LABELS_FILE}); run `smpo label`")
    return [folder / name for name in read_json(folder / LABELS_FILE)["shards"]]


def read_label_metadata(folder: str | Path) -> dict[str, Any]:
    """The ``labels.json`` of a labelled dataset: scorer, score range, counts, summary."""
    return read_json(Path(folder) / LABELS_FILE)


def load_labelled(folder: str | Path):
    """A labelled dataset as a ``datasets.Dataset`` (memory-mapped; images stay encoded bytes)."""
    import datasets

    return datasets.load_dataset("parquet", data_files=[str(p) for p in labelled_shards(folder)], split="train")


# ---------------------------------------------------------------------------------------------------
# Output folder: new, resumed, or refused.


def _load_scorer(name: str, path: str | Path | None, *, device: torch.device, dtype: torch.dtype,
                 batch_size: int) -> ScoreFn:
    from smpo.rewards import load_scorer

    return load_scorer(name, path, device=device, dtype=dtype, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------------
# Phase 2: finalisation.


def shard_name(k: int, n: int) -> str:
    return f"train-{k:05d}-of-{n:05d}.parquet"


def finalise(out: Path, *, score_min: float | None = None, score_max: float | None = None) -> LabelSummary:
    """Fix the score range, write the final shards with ``winner``/``p_win``, then ``labels.json``.

    Safe to interrupt and repeat: the range is recorded before the first final shard is written, and
    each final shard is a pure function of its scored shard and that range.
    """
    work = out / WORK_DIR
    settings = RunSettings(**read_json(work / "run.json"))
    plan_file = work / "finalise.json"
    if plan_file.exists():
        plan = read_json(plan_file)
        asked = {"score_min": score_min, "score_max": score_max}
        if asked != plan["asked"]:
            raise LabelError(f"finalisation of {out} began with --score-min/--score-max {plan['asked']}; "
                             f"rerun with those (now {asked}) or pass --overwrite")
    else:
        plan = _plan(work, settings, score_min=score_min, score_max=score_max)
        write_json(plan_file, plan)
    n = plan["num_shards"]
    for k in range(n):
        scored_dir, final = shard_dir(work, k), out / shard_name(k, n)
        if scored_dir.is_dir():
            table = pq.read_table(scored_dir / "scored.parquet")
            _write_final_shard(final, with_labels(table, plan["score_min"], plan["score_max"]))
            shutil.rmtree(scored_dir)
        elif not final.exists():
            raise LabelError(f"{out}: neither the scored shard {scored_dir.name} nor {final.name} exists")
    summary = summarise(out, plan, settings)
    write_json(out / LABELS_FILE, _metadata(summary, plan, settings))
    shutil.rmtree(work)
    return summary


def _plan(work: Path, settings: RunSettings, *, score_min: float | None, score_max: float | None) -> dict[str, Any]:
    """The finalisation plan: number of shards, merged counts, and the score range (Eq. 11)."""
    from smpo.preference import score_range

    source_file = work / "source.json"
    if not source_file.exists():
        raise LabelError(f"{work.parent}: the scoring pass did not reach the end of the source; rerun to resume")
    n = math.ceil(read_json(source_file)["num_rows"] / settings.shard_size)
    missing = [k for k in range(n) if not shard_dir(work, k).is_dir()]
    if missing:
        raise LabelError(f"{work.parent}: shards {missing[:10]} of {n} are not scored; rerun to resume")
    records = [read_json(shard_dir(work, k) / "stats.json") for k in range(n)]
    stats = ReadStats()
    for record in records:
        stats.update(ReadStats.from_dict(record))
    if stats.pairs == 0:
        raise LabelError(f"nothing to label: all {stats.rows} rows of {settings.source} were skipped or ties")
    bounds = [r[key] for r in records for key in ("score_min", "score_max") if r[key] is not None]
    data_min, data_max = score_range(np.asarray(bounds))
    lo = data_min if score_min is None else float(score_min)
    hi = data_max if score_max is None else float(score_max)
    if not hi > lo:
        raise LabelError(f"the score range must have score_min < score_max; got [{lo}, {hi}]")
    return {"num_shards": n, "stats": stats.to_dict(), "score_min": lo, "score_max": hi,
            "data_score_min": data_min, "data_score_max": data_max,
            "asked": {"score_min": score_min, "score_max": score_max}}


def with_labels(scored: pa.Table, score_min: float, score_max: float) -> pa.Table:
    """Add ``winner`` (the higher-scored image; 0 on equal scores) and ``p_win`` (Eq. 11) after ``score_1``."""
    from smpo.preference import win_probability

    score_0 = scored.column("score_0").to_numpy()
    score_1 = scored.column("score_1").to_numpy()
    winner = (score_1 > score_0).astype(np.int64)
    p_win = win_probability(torch.from_numpy(np.maximum(score_0, score_1)),
                            torch.from_numpy(np.minimum(score_0, score_1)),
                            score_min=score_min, score_max=score_max).to(torch.float64).numpy()
    at = scored.schema.get_field_index("score_1") + 1
    scored = scored.add_column(at, pa.field("winner", pa.int64()), pa.array(winner, pa.int64()))
    return scored.add_column(at + 1, pa.field("p_win", pa.float64()), pa.array(p_win, pa.float64()))


def _write_final_shard(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_PAIRS)


def summarise(out: Path, plan: dict[str, Any], settings: RunSettings) -> LabelSummary:
    """Counts, ``p_win`` quantiles and the reward model's agreement with the human labels."""
    n = plan["num_shards"]
    names = [shard_name(k, n) for k in range(n)]
    table = pa.concat_tables(pq.read_table(out / name, columns=["pair_id", "label_0", "winner", "p_win"])
                             for name in names)
    label_0, winner = table.column("label_0").to_numpy(), table.column("winner").to_numpy()
    p_win = table.column("p_win").to_numpy()
    humans = [human_winner(v) for v in label_0.tolist()]
    decided = np.array([h is not None for h in humans], dtype=bool)
    agreement = (float(np.mean(winner[decided] == np.array([h for h in humans if h is not None])))
                 if decided.any() else None)
    ids = table.column("pair_id").to_pylist()
    stats = ReadStats.from_dict(plan["stats"])
    overridden = plan["asked"]["score_min"] is not None or plan["asked"]["score_max"] is not None
    return LabelSummary(
        output=str(out), scorer=settings.scorer, source=settings.source, rows=stats.rows, pairs=table.num_rows,
        ties=stats.ties, ties_kept=settings.keep_ties, skipped=[asdict(s) for s in stats.skipped],
        score_min=plan["score_min"], score_max=plan["score_max"],
        score_range_from="override" if overridden else "data",
        p_win_quantiles={f"{q:g}": float(v) for q, v in zip(QUANTILES, np.quantile(p_win, QUANTILES))},
        agreement=agreement, agreement_pairs=int(decided.sum()), duplicate_pair_ids=len(ids) - len(set(ids)),
        shards=names,
    )


def _metadata(summary: LabelSummary, plan: dict[str, Any], settings: RunSettings) -> dict[str, Any]:
    return {
        "format": FORMAT,
        **asdict(summary),
        "data_score_min": plan["data_score_min"],
        "data_score_max": plan["data_score_max"],
        "columns": list(pq.read_schema(Path(summary.output) / summary.shards[0]).names),
        "counts": {"rows": summary.rows, "pairs": summary.pairs, "ties": summary.ties,
                   "skipped": len(summary.skipped)},
        "settings": asdict(settings),
    }


# ---------------------------------------------------------------------------------------------------
# Command line.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="pairs in the Pick-a-Pic v2 schema: a save_to_disk folder, a parquet file or "
                        "folder, a hub dataset id (streamed), or a JSONL of {prompt, image_0, image_1, label_0}")
    parser.add_argument("output", nargs="?", default=None,
                        help="the new labelled dataset folder (an unfinished run there is resumed); or --output")
    parser.add_argument("--output", dest="output_option", metavar="OUTPUT", default=None,
                        help="the same as the OUTPUT argument (the option every smpo command takes)")
    parser.add_argument("--scorer", default="pickscore",
                        help="reward model: pickscore (default), hpsv2.1, imagereward, aesthetic, clip, world")
    parser.add_argument("--scorer-path", default=None, help="local folder/file or hub id of the scorer's weights")
    parser.add_argument("--split", default="train", help="split of a dataset dict, parquet folder or hub set")
    parser.add_argument("--keep-ties", action="store_true", help="keep pairs the human labelled a tie (0.5)")
    parser.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE, help="pairs per scorer call")
    parser.add_argument("--shard-size", type=_positive_int, default=DEFAULT_SHARD_SIZE,
                        help="source rows per output shard (also the unit of resumption)")
    parser.add_argument("--score-min", type=float, default=None, help="min S of Eq. 11 (default: over the scored data)")
    parser.add_argument("--score-max", type=float, default=None, help="max S of Eq. 11 (default: over the scored data)")
    parser.add_argument("--limit", type=_positive_int, default=None, help="read only the first N rows of the source")
    parser.add_argument("--device", default=None, help="scorer device (default: this process's accelerate device)")
    parser.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 elsewhere)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _output(args: argparse.Namespace) -> str:
    if (args.output is None) == (args.output_option is None):
        raise LabelError("give the output folder once, as OUTPUT or --output")
    return args.output if args.output is not None else args.output_option


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    # A mistake in the input (missing file or columns, bad rows, an existing output) ends in one
    # line and exit status 2 (smpo.cli.main).
    summary = label_pairs(
        args.source, _output(args), scorer=args.scorer, scorer_path=args.scorer_path, split=args.split,
        keep_ties=args.keep_ties, batch_size=args.batch_size, shard_size=args.shard_size,
        score_min=args.score_min, score_max=args.score_max, limit=args.limit, device=args.device,
        dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress,
    )
    from smpo.processes import process_state

    if process_state().is_main_process:
        print(summary.format())
    return 0
