"""`smpo evaluate`: score a generated folder with reward models (ALGORITHM.md section 7).

Any scorer that :func:`smpo.rewards.load_scorer` accepts can be used (the paper's five by default:
pickscore, hpsv2.1, imagereward, aesthetic, clip). Each image is scored with its own prompt.
Scores are kept on the scale the scorer returns (docs/scorers.md: PickScore, HPSv2.1 and CLIP
already come as ``100 x cosine`` / ``logit_scale x cosine``, the paper's scale).

Output folder (default ``FOLDER/evaluation``):

- ``scores.parquet`` and ``scores.csv``: one row per image (the manifest columns plus one column per
  scorer);
- ``summary.csv`` and ``summary.json``: per scorer the number of images, the median and the mean,
  each with a percentile bootstrap 95% interval over prompts (:mod:`smpo.evaluation.stats`);
- ``evaluation.json``: the generated folder, the scorers and their paths and scales.

Resuming: scores are written in small pieces (``parts/SCORER/part-NNNNN.parquet``, atomically); a
rerun removes the piece a kill left half-written and scores only the images that no piece holds
yet (its tables are an uninterrupted run's).

Several processes (``accelerate launch`` / ``torchrun``): every process lists the same missing
images and cuts them into the same pieces; process ``i`` of ``n`` scores pieces ``i, i + n, ...``,
and the tables are made from the pieces once all are on disk (the bytes of a one-process run).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from smpo.evaluation import stats
from smpo.evaluation.manifest import KEY_COLUMNS, read_manifest
from smpo.io import atomic_path, prepare_output_dir, read_json, remove_temporaries, write_json

PAPER_SCORERS = ("pickscore", "hpsv2.1", "imagereward", "aesthetic", "clip")
RECORD = "evaluation.json"
SCORES = "scores.parquet"


def evaluate_folder(folder: str | os.PathLike, scorers: Sequence[str] = PAPER_SCORERS, *,
                    scorer_paths: Mapping[str, str] | None = None, out: str | os.PathLike | None = None,
                    loaded: Mapping[str, object] | None = None, batch_size: int = 16, chunk_size: int = 64,
                    device: str | None = None, dtype: str | None = None, num_resamples: int = 1000,
                    confidence: float = 0.95, seed: int = 0, overwrite: bool = False,
                    progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score every image of ``folder`` with ``scorers``; returns (per-image table, summary).

    ``loaded`` may give already-built scorers (``name -> scorer(images, prompts)``); the others are
    loaded with ``smpo.rewards.load_scorer(name, path=scorer_paths.get(name), ...)``.
    """
    folder = Path(folder)
    scorers = _unique(scorers)
    scorer_paths = dict(scorer_paths or {})
    unknown = sorted(set(scorer_paths) - set(scorers))
    if unknown:
        raise ValueError(f"scorer path given for {unknown}, which {'is' if len(unknown) == 1 else 'are'} not run; "
                         f"scorers: {', '.join(scorers)}")
    from smpo.processes import process_state

    state = process_state()
    out = Path(out) if out is not None else folder / "evaluation"
    if state.is_main_process:
        prepare_output_dir(out, overwrite=overwrite)
        for place in (out, *(out / "parts" / _safe(name) for name in scorers)):  # what a kill half wrote
            remove_temporaries(place)
    state.wait_for_everyone()
    records = read_manifest(folder)
    if not records:
        raise ValueError(f"{folder}/manifest.jsonl lists no images")
    info = _check_record(out, folder, scorers, scorer_paths)
    table = pd.DataFrame([r.__dict__ for r in records])
    for name in scorers:
        def note_scale(scale: str, name: str = name) -> None:  # before the first piece: a rerun may score none
            info["scorers"][name]["scale"] = scale
            if state.is_main_process:
                write_json(out / RECORD, info)

        info["scorers"][name].setdefault("scale", "")
        _score_missing(name, table, folder, out, loaded=(loaded or {}).get(name), path=scorer_paths.get(name),
                       batch_size=batch_size, chunk_size=chunk_size, device=device, dtype=dtype,
                       progress=progress and state.is_local_main_process, rank=state.process_index,
                       world=state.num_processes, wait=state.wait_for_everyone, on_scale=note_scale)
        if state.is_main_process:
            write_json(out / RECORD, info)
        table[name] = _read_scores(out, name, table)
    summary = summarize(table, scorers, num_resamples=num_resamples, confidence=confidence, seed=seed)
    if state.is_main_process:
        _write_outputs(out, table, summary)
    return table, summary


def summarize(table: pd.DataFrame, scorers: Sequence[str], *, num_resamples: int = 1000, confidence: float = 0.95,
              seed: int = 0) -> pd.DataFrame:
    """Per scorer: n, median, mean, and their bootstrap intervals (prompts resampled)."""
    rows = []
    for name in scorers:
        values = table[name].to_numpy(dtype=float)
        row = {"scorer": name, "n": len(values)}
        for statistic in ("median", "mean"):
            row[statistic] = stats.STATISTICS[statistic](values).item()
            low, high = stats.bootstrap_interval(values, statistic, groups=table["prompt_index"].to_numpy(),
                                                 num_resamples=num_resamples, confidence=confidence, seed=seed)
            row[f"{statistic}_low"], row[f"{statistic}_high"] = low, high
        rows.append(row)
    return pd.DataFrame(rows, columns=["scorer", "n", "median", "median_low", "median_high", "mean", "mean_low",
                                       "mean_high"])


def _unique(names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        names = [names]
    result = []
    for name in names:
        if name not in result:
            result.append(name)
    if not result:
        raise ValueError("no scorer to run")
    return result


def _check_record(out: Path, folder: Path, scorers: Sequence[str], paths: Mapping[str, str]) -> dict:
    """Load (or start) ``evaluation.json``; refuse to mix scores of a scorer loaded from another path."""
    info = read_json(out / RECORD) if (out / RECORD).is_file() else {"source": str(folder.resolve()), "scorers": {}}
    for name in scorers:
        previous = info["scorers"].get(name)
        path = paths.get(name)
        if previous is not None and previous.get("path") != path:
            raise ValueError(f"{out} holds {name} scores from path {previous.get('path')!r}, now {path!r}; "
                             "pass --overwrite to recompute them")
        info["scorers"].setdefault(name, {"path": path})
    # evaluation.json is written with sorted keys: keep the scorers' order (the report's column order) apart.
    info["scorer_order"] = [*[s for s in info.get("scorer_order", []) if s not in scorers], *scorers]
    info["source"] = str(folder.resolve())
    return info


def _parts(out: Path, name: str) -> list[Path]:
    return sorted((out / "parts" / _safe(name)).glob("part-*.parquet"))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _done_keys(out: Path, name: str) -> set[tuple[int, int]]:
    keys: set[tuple[int, int]] = set()
    for part in _parts(out, name):
        frame = pd.read_parquet(part, columns=list(KEY_COLUMNS))
        keys.update(zip(frame["prompt_index"].tolist(), frame["image_index"].tolist()))
    return keys


def _score_missing(name: str, table: pd.DataFrame, folder: Path, out: Path, *, loaded, path, batch_size: int,
                   chunk_size: int, device, dtype, progress: bool, rank: int = 0, world: int = 1,
                   wait: Callable[[], None] = lambda: None, on_scale: Callable[[str], None] = lambda scale: None
                   ) -> None:
    """Score the images of ``table`` that no piece of ``name`` holds.

    Process ``rank`` of ``world`` scores pieces ``rank, rank + world, ...`` of the missing images;
    ``wait`` (a barrier) makes every process list the missing images before any writes a piece;
    ``on_scale(note)`` gets the loaded scorer's scale note before its first piece is written.
    """
    from smpo.processes import wait_until

    done = _done_keys(out, name)
    # new pieces are numbered after the highest existing one, so they never replace a finished piece
    first = max((int(p.stem.split("-")[1]) for p in _parts(out, name)), default=-1) + 1
    wait()
    todo = table[[k not in done for k in zip(table["prompt_index"], table["image_index"])]]
    if todo.empty:
        return
    starts = list(range(0, len(todo), chunk_size))
    piece = lambda k: out / "parts" / _safe(name) / f"part-{first + k:05d}.parquet"  # noqa: E731
    mine = [k for k in range(len(starts)) if k % world == rank]
    scorer = loaded
    if scorer is None and mine:
        from smpo.rewards import load_scorer

        scorer = load_scorer(name, path=path, device=device, dtype=dtype, batch_size=batch_size)
    if scorer is not None:
        on_scale(getattr(scorer, "scale", "") or "")
    for k in tqdm(mine, desc=f"score {name}", unit="chunk", disable=not progress):
        chunk = todo.iloc[starts[k] : starts[k] + chunk_size]
        images = [_open(folder / f) for f in chunk["file"]]
        scores = scorer(images, chunk["prompt"].tolist())
        with atomic_path(piece(k)) as tmp:
            chunk[list(KEY_COLUMNS)].assign(score=[float(s) for s in scores]).to_parquet(tmp, index=False)
    if loaded is None and scorer is not None:
        del scorer
        gc.collect()
        _empty_cuda_cache()
    if world > 1:  # the others' pieces: met on disk, not at a barrier (processes may run hours apart)
        wait_until(lambda: all(piece(k).exists() for k in range(len(starts))), f"the {name} scores of the other "
                   "processes", "smpo evaluate")


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is listed in the manifest but missing") from None


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _read_scores(out: Path, name: str, table: pd.DataFrame) -> pd.Series:
    pieces = pd.concat([pd.read_parquet(p) for p in _parts(out, name)], ignore_index=True)
    pieces = pieces.drop_duplicates(list(KEY_COLUMNS), keep="last").set_index(list(KEY_COLUMNS))["score"]
    keys = pd.MultiIndex.from_frame(table[list(KEY_COLUMNS)])
    return pd.Series(pieces.reindex(keys).to_numpy(), index=table.index, name=name)


def _write_outputs(out: Path, table: pd.DataFrame, summary: pd.DataFrame) -> None:
    with atomic_path(out / SCORES) as tmp:
        table.to_parquet(tmp, index=False)
    with atomic_path(out / "scores.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    write_json(out / "summary.json", {row["scorer"]: {k: v for k, v in row.items() if k != "scorer"}
                                      for row in json.loads(summary.to_json(orient="records"))})


def parse_scorer_paths(items: Sequence[str] | None) -> dict[str, str]:
    """``["pickscore=/dir", ...]`` -> ``{"pickscore": "/dir"}``."""
    paths = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--scorer-path {item!r}: expected NAME=PATH, e.g. pickscore=/models/pickscore")
        paths[name] = path
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="an `smpo generate` output folder (images + manifest.jsonl)")
    parser.add_argument("--scorers", nargs="+", default=list(PAPER_SCORERS),
                        help=f"scorers to run (default: {' '.join(PAPER_SCORERS)}); any name smpo.rewards accepts")
    parser.add_argument("--scorer-path", action="append", metavar="NAME=PATH",
                        help="local folder or hub id of a scorer's weights; repeat per scorer")
    parser.add_argument("--output", "--out", dest="out", help="output folder (default: FOLDER/evaluation)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per scorer forward pass")
    parser.add_argument("--chunk-size", type=int, default=64, help="images per saved piece (resume granularity)")
    parser.add_argument("--device", help="device (default: the best available)")
    parser.add_argument("--dtype", help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 elsewhere)")
    parser.add_argument("--num-resamples", type=int, default=1000, help="bootstrap resamples for the intervals")
    parser.add_argument("--confidence", type=float, default=0.95, help="interval coverage")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--overwrite", action="store_true", help="recompute everything in an existing output folder")


def run(args: argparse.Namespace) -> int:
    table, summary = evaluate_folder(
        args.folder, args.scorers, scorer_paths=parse_scorer_paths(args.scorer_path), out=args.out,
        batch_size=args.batch_size, chunk_size=args.chunk_size, device=args.device, dtype=args.dtype,
        num_resamples=args.num_resamples, confidence=args.confidence, seed=args.seed, overwrite=args.overwrite,
    )
    print(summary.to_string(index=False))
    print(f"{len(table)} images scored; tables in {args.out or Path(args.folder) / 'evaluation'}")
    return 0
