"""`smpo compare A B [C ...]`: win rates and a Table-2-style report (ALGORITHM.md section 7).

The first model is the one being judged, as SmPO is in the paper's Table 2: every other model's
row shows its median (and mean) score and A's win rate against it. Win rates (ties count one half)
are computed over images paired by prompt and seed, with a percentile bootstrap interval over
prompts (:mod:`smpo.evaluation.stats`); ``winrates.csv`` also holds every other pair of models.

All models must have been evaluated on the same images: the same (prompt index, image index)
pairs with the same prompt text and seed. Any difference is an error that names it.

Scores are shown on the paper's scale. ``smpo.rewards`` already returns PickScore
(``logit_scale x cosine``), HPSv2.1 and CLIP (``100 x cosine``) on the paper's "x100" scale
(docs/scorers.md), so the default display factor is 1 for every scorer; ``--display-scale
NAME=FACTOR`` multiplies a scorer's displayed numbers (e.g. ``clip=100`` for a scorer that returns
a raw cosine). Win rates do not depend on the factor.

Outputs: ``table.md`` and ``table.csv`` (Table 2 style), ``winrates.csv`` (all pairs),
``summary.csv`` (median, mean, intervals per model and scorer), ``report.png`` (score distributions
per model, win-rate bars) and ``report.html`` (the tables, the plot, side-by-side images for a
sample of prompts).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from smpo.evaluation import report, stats
from smpo.evaluation.evaluate import summarize
from smpo.evaluation.evaluated import EvaluatedModel, load_evaluated
from smpo.evaluation.manifest import KEY_COLUMNS
from smpo.evaluation.report import format_number, label
from smpo.io import atomic_path, prepare_output_dir


def check_same_images(models: Sequence[EvaluatedModel]) -> None:
    """Every model must hold the same (prompt, image) keys, prompt texts and seeds as the first."""
    first = models[0]
    reference = first.table.set_index(list(KEY_COLUMNS))
    for other in models[1:]:
        table = other.table.set_index(list(KEY_COLUMNS))
        problems = []
        missing = reference.index.difference(table.index)
        extra = table.index.difference(reference.index)
        if len(missing):
            problems.append(f"{other.name} lacks {len(missing)} image(s) of {first.name}: {_describe(reference, missing)}")
        if len(extra):
            problems.append(f"{other.name} has {len(extra)} image(s) that {first.name} lacks: {_describe(table, extra)}")
        common = reference.index.intersection(table.index)
        for column in ("prompt", "seed"):
            if column in reference and column in table:
                a, b = reference.loc[common, column], table.loc[common, column]
                differ = common[(a != b).to_numpy()]
                if len(differ):
                    key = differ[0]
                    problems.append(f"{len(differ)} image(s) differ in {column}, first prompt {key[0]} image {key[1]}: "
                                    f"{_plain(reference.loc[key, column])!r} in {first.name}, "
                                    f"{_plain(table.loc[key, column])!r} in {other.name}")
        if problems:
            raise ValueError(f"{first.name} and {other.name} were not evaluated on the same prompts and seeds: "
                             + "; ".join(problems))


def _plain(value: object) -> object:
    """A numpy scalar as the Python value it holds (for messages)."""
    return value.item() if isinstance(value, np.generic) else value


def _describe(table: pd.DataFrame, keys: pd.Index, shown: int = 3) -> str:
    parts = [f"prompt {p} image {i} ({table.loc[(p, i), 'prompt']!r})" for p, i in list(keys)[:shown]]
    return ", ".join(parts) + (", ..." if len(keys) > shown else "")


def common_scorers(models: Sequence[EvaluatedModel], wanted: Sequence[str] | None = None) -> list[str]:
    """The scorers every model was scored with (in the first model's order), or ``wanted`` after a check."""
    if wanted:
        for model in models:
            missing = [s for s in wanted if s not in model.table.columns]
            if missing:
                raise ValueError(f"{model.name} has no scores for {missing}; it has {', '.join(model.scorers)}")
        return list(wanted)
    scorers = [s for s in models[0].scorers if all(s in m.table.columns for m in models)]
    if not scorers:
        raise ValueError("the models share no scorer: " + "; ".join(f"{m.name}: {m.scorers}" for m in models))
    return scorers


def paired_scores(a: EvaluatedModel, b: EvaluatedModel, scorer: str) -> pd.DataFrame:
    """Columns ``prompt_index``, ``a``, ``b``: the two models' scores of the same images."""
    left = a.table[[*KEY_COLUMNS, scorer]].rename(columns={scorer: "a"})
    right = b.table[[*KEY_COLUMNS, scorer]].rename(columns={scorer: "b"})
    return left.merge(right, on=list(KEY_COLUMNS), how="inner", validate="one_to_one")


def win_rates(models: Sequence[EvaluatedModel], scorers: Sequence[str], *, num_resamples: int = 1000,
              confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Win rate (ties one half) of each model over each later one, per scorer, with a bootstrap interval."""
    rows = []
    for i, a in enumerate(models):
        for b in models[i + 1 :]:
            for scorer in scorers:
                pairs = paired_scores(a, b, scorer)
                outcomes = stats.win_outcomes(pairs["a"], pairs["b"])
                low, high = stats.bootstrap_interval(outcomes, "mean", groups=pairs["prompt_index"].to_numpy(),
                                                     num_resamples=num_resamples, confidence=confidence, seed=seed)
                rows.append({"model_a": a.name, "model_b": b.name, "scorer": scorer, "n": len(outcomes),
                             "wins": int((outcomes == 1).sum()), "ties": int((outcomes == 0.5).sum()),
                             "win_rate": float(outcomes.mean()), "win_rate_low": low, "win_rate_high": high})
    return pd.DataFrame(rows)


def table2(summaries: Mapping[str, pd.DataFrame], rates: pd.DataFrame, scorers: Sequence[str], judged: str,
           display_scale: Mapping[str, float]) -> pd.DataFrame:
    """One row per model: per scorer the median and mean (display scale) and the judged model's win rate (%)."""
    rows = []
    for name, summary in summaries.items():
        row: dict[str, object] = {"model": name}
        by_scorer = summary.set_index("scorer")
        for s in scorers:
            factor = display_scale.get(s, 1.0)
            row[f"{s} median"] = by_scorer.loc[s, "median"] * factor
            row[f"{s} mean"] = by_scorer.loc[s, "mean"] * factor
            match = rates[(rates.model_a == judged) & (rates.model_b == name) & (rates.scorer == s)]
            for column, key in (("WR", "win_rate"), ("WR low", "win_rate_low"), ("WR high", "win_rate_high")):
                row[f"{s} {column}"] = 100 * float(match[key].iloc[0]) if len(match) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def table2_markdown(table: pd.DataFrame, scorers: Sequence[str], judged: str) -> str:
    """Table 2 of the paper in markdown: per scorer the median score and the judged model's win rate."""
    header = ["Model"] + [f"{label(s)} {part}" for s in scorers for part in ("median", f"WR of {judged} (%)")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [str(row["model"])]
        for s in scorers:
            cells.append(format_number(row[f"{s} median"]))
            cells.append(stats.win_rate_cell(row[f"{s} WR"], row[f"{s} WR low"], row[f"{s} WR high"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(paths: Sequence[str | os.PathLike], out: str | os.PathLike, *, names: Sequence[str] | None = None,
            scorers: Sequence[str] | None = None, display_scale: Mapping[str, float] | None = None,
            num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0, grid_prompts: int = 8,
            overwrite: bool = False) -> dict[str, Path]:
    """Compare evaluated models; writes the report files into ``out`` and returns their paths by kind."""
    if len(paths) < 2:
        raise ValueError("compare needs at least two evaluated models")
    if names is not None and len(names) != len(paths):
        raise ValueError(f"got {len(names)} names for {len(paths)} models")
    models = [load_evaluated(p, None if names is None else names[i]) for i, p in enumerate(paths)]
    duplicate = {m.name for m in models if [n.name for n in models].count(m.name) > 1}
    if duplicate:
        raise ValueError(f"model names must differ, {sorted(duplicate)} repeats; pass --names")
    check_same_images(models)
    scorers = common_scorers(models, scorers)
    display_scale = dict(display_scale or {})
    out = prepare_output_dir(out, overwrite=overwrite, resume=False)

    summaries = {m.name: summarize(m.table, scorers, num_resamples=num_resamples, confidence=confidence, seed=seed)
                 for m in models}
    rates = win_rates(models, scorers, num_resamples=num_resamples, confidence=confidence, seed=seed)
    table = table2(summaries, rates, scorers, models[0].name, display_scale)
    long_summary = pd.concat([s.assign(model=n) for n, s in summaries.items()], ignore_index=True)

    files = {"table_md": out / "table.md", "table_csv": out / "table.csv", "winrates": out / "winrates.csv",
             "summary": out / "summary.csv", "plot": out / "report.png", "page": out / "report.html"}
    _write_text(files["table_md"], table2_markdown(table, scorers, models[0].name))
    _write_frame(files["table_csv"], table)
    _write_frame(files["winrates"], rates)
    _write_frame(files["summary"], long_summary[["model", *summaries[models[0].name].columns]])
    report.plot(files["plot"], models, scorers, rates, display_scale)
    report.page(files["page"], models, scorers, table, rates, display_scale=display_scale, grid_prompts=grid_prompts,
                seed=seed, plot_name=files["plot"].name)
    return files


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _write_frame(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def parse_display_scale(items: Sequence[str] | None) -> dict[str, float]:
    """``["clip=100"]`` -> ``{"clip": 100.0}``."""
    scales = {}
    for item in items or []:
        name, _, value = item.partition("=")
        try:
            scales[name] = float(value)
        except ValueError:
            name = ""
        if not name:
            raise ValueError(f"--display-scale {item!r}: expected NAME=FACTOR, e.g. clip=100")
    return scales


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", help="evaluated folders (generated folders with evaluation/, "
                        "evaluation folders or scores.parquet files); the first one is judged against the others")
    parser.add_argument("--output", "--out", dest="out", required=True, help="report folder")
    parser.add_argument("--names", nargs="+", help="model names (default: folder names)")
    parser.add_argument("--scorers", nargs="+", help="scorers to compare (default: all that every model has)")
    parser.add_argument("--display-scale", action="append", metavar="NAME=FACTOR",
                        help="multiply a scorer's shown scores (default 1: smpo.rewards already returns the paper's x100 scale)")
    parser.add_argument("--num-resamples", type=int, default=1000, help="bootstrap resamples for the intervals")
    parser.add_argument("--confidence", type=float, default=0.95, help="interval coverage")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the prompt sample")
    parser.add_argument("--grid-prompts", type=int, default=8, help="prompts shown side by side in report.html")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report folder")


def run(args: argparse.Namespace) -> int:
    files = compare(args.models, args.out, names=args.names, scorers=args.scorers,
                    display_scale=parse_display_scale(args.display_scale), num_resamples=args.num_resamples,
                    confidence=args.confidence, seed=args.seed, grid_prompts=args.grid_prompts,
                    overwrite=args.overwrite)
    print(files["table_md"].read_text())
    print(f"report: {files['page']}")
    return 0


__all__ = ["EvaluatedModel", "check_same_images", "compare", "load_evaluated", "table2", "win_rates"]
