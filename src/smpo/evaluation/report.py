"""The comparison report: a PNG plot and an HTML page (written by :func:`smpo.evaluation.compare.compare`).

- ``report.png``: one column per scorer; top row the distribution of each model's scores (box
  plots, display scale), bottom row the judged (first) model's win rate against each other model
  with its bootstrap interval, and a dashed line at 50%. The PNG's ``Description`` text chunk lists
  the scorers shown.
- ``report.html``: one self-contained page (images embedded as data URIs): the Table-2-style
  table, all pairwise win rates, the plot, and for a random sample of prompts (seeded) the first
  image of each model side by side with its scores.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from smpo.evaluation.evaluated import EvaluatedModel
from smpo.evaluation.stats import win_rate_cell
from smpo.io import atomic_path

SCORER_LABELS = {"pickscore": "PickScore", "hpsv2.1": "HPSv2.1", "imagereward": "ImageReward",
                 "aesthetic": "Aesthetic", "clip": "CLIP"}


def label(scorer: str) -> str:
    """The paper's name of a scorer (any other name is shown as is)."""
    return SCORER_LABELS.get(scorer, scorer)


def format_number(value: float) -> str:
    """Three decimals below 10 (ImageReward, aesthetic), two above (the x100 scores), as Table 2."""
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"


def thumbnail_data_uri(path: Path, size: int = 256) -> str:
    """A PNG data URI of the image at ``path``, at most ``size`` pixels on its longer side."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def plot(path: Path, models: Sequence[EvaluatedModel], scorers: Sequence[str], rates: pd.DataFrame,
         display_scale: Mapping[str, float]) -> Path:
    """Score distributions per model and win-rate bars, one column per scorer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    judged, others = models[0].name, [m.name for m in models[1:]]
    fig = Figure(figsize=(max(3.2 * len(scorers), 4.0), 6.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(scorers), squeeze=False)
    for column, scorer in enumerate(scorers):
        factor = display_scale.get(scorer, 1.0)
        top, bottom = axes[0, column], axes[1, column]
        top.boxplot([m.table[scorer].to_numpy(dtype=float) * factor for m in models], showmeans=True)
        top.set_xticks(range(1, len(models) + 1), [m.name for m in models], rotation=30, ha="right")
        top.set_title(f"{label(scorer)} scores")
        mine = rates[(rates.model_a == judged) & (rates.scorer == scorer)].set_index("model_b").loc[others]
        centre = 100 * mine["win_rate"].to_numpy()
        error = 100 * np.abs(np.stack([mine["win_rate"] - mine["win_rate_low"],
                                       mine["win_rate_high"] - mine["win_rate"]]))
        bottom.bar(range(len(others)), centre, yerr=error, capsize=4, color="tab:blue")
        bottom.axhline(50, color="grey", linestyle="--", linewidth=1)
        bottom.set_ylim(0, 100)
        bottom.set_xticks(range(len(others)), [f"vs {o}" for o in others], rotation=30, ha="right")
        bottom.set_title(f"{label(scorer)}: {judged} win rate (%)")
    fig.suptitle(f"{judged} against {', '.join(others)}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100,
                    metadata={"Title": "smpo compare", "Description": "scorers: " + ", ".join(scorers)})
    return path


def page(path: Path, models: Sequence[EvaluatedModel], scorers: Sequence[str], table: pd.DataFrame,
         rates: pd.DataFrame, *, display_scale: Mapping[str, float] | None = None, grid_prompts: int = 8,
         seed: int = 0, plot_name: str = "report.png") -> Path:
    """The HTML report page."""
    judged = models[0].name
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>smpo compare</title>',
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}"
        "td.prompt{text-align:left;max-width:24em}img.sample{width:192px;image-rendering:pixelated}</style>",
        "</head><body>",
        f"<h1>{_e(judged)} against {_e(', '.join(m.name for m in models[1:]))}</h1>",
        f"<p>Scorers: {_e(', '.join(label(s) for s in scorers))}. Win rate: share of images (same prompt and "
        "seed) that the scorer prefers from the first model; ties count one half. Intervals: bootstrap 95% over "
        "prompts.</p>",
        "<h2>Median score and win rate</h2>",
        _table2_html(table, scorers, judged),
        "<h2>All pairwise win rates</h2>",
        _frame_html(rates.assign(scorer=rates.scorer.map(label)), table_id="winrates"),
        f'<h2>Plot</h2><img src="{_e(plot_name)}" alt="score distributions and win rates">',
        "<h2>Samples</h2>",
        _grid_html(models, scorers, display_scale=display_scale or {}, grid_prompts=grid_prompts, seed=seed),
        "</body></html>",
    ]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


def _e(text: object) -> str:
    return html.escape(str(text))


def _table2_html(table: pd.DataFrame, scorers: Sequence[str], judged: str) -> str:
    head = "<tr><th rowspan=2>Model</th>" + "".join(f"<th colspan=3>{_e(label(s))}</th>" for s in scorers) + "</tr>"
    head += "<tr>" + f"<th>median</th><th>mean</th><th>WR of {_e(judged)} (%)</th>" * len(scorers) + "</tr>"
    body = []
    for _, row in table.iterrows():
        cells = [f"<td>{_e(row['model'])}</td>"]
        for s in scorers:
            wr_text = win_rate_cell(row[f"{s} WR"], row[f"{s} WR low"], row[f"{s} WR high"])
            cells += [f"<td>{format_number(row[f'{s} median'])}</td>", f"<td>{format_number(row[f'{s} mean'])}</td>",
                      f"<td>{wr_text}</td>"]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="table2">{head}{"".join(body)}</table>'


def _frame_html(frame: pd.DataFrame, *, table_id: str) -> str:
    head = "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in frame.columns) + "</tr>"
    rows = ["<tr>" + "".join(f"<td>{_e(_fmt(v))}</td>" for v in row) + "</tr>" for row in frame.itertuples(index=False)]
    return f'<table id="{table_id}">{head}{"".join(rows)}</table>'


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _grid_html(models: Sequence[EvaluatedModel], scorers: Sequence[str], *, display_scale: Mapping[str, float],
               grid_prompts: int, seed: int) -> str:
    first = models[0].table
    first = first[first["image_index"] == first["image_index"].min()]
    prompt_ids = first["prompt_index"].to_numpy()
    count = min(grid_prompts, len(prompt_ids))
    chosen = np.sort(np.random.default_rng(seed).choice(prompt_ids, size=count, replace=False)) if count else []
    image_index = int(first["image_index"].min()) if len(first) else 0
    head = "<tr><th>prompt</th>" + "".join(f"<th>{_e(m.name)}</th>" for m in models) + "</tr>"
    rows = []
    for p in chosen:
        prompt = first.loc[first["prompt_index"] == p, "prompt"].iloc[0]
        cells = [f'<td class="prompt">{int(p)}: {_e(prompt)}</td>']
        for m in models:
            row = m.table[(m.table["prompt_index"] == p) & (m.table["image_index"] == image_index)].iloc[0]
            image_path = m.images / row["file"] if m.images is not None else None
            image = (f'<img class="sample" src="{thumbnail_data_uri(image_path)}" alt="{_e(m.name)} prompt {int(p)}">'
                     if image_path is not None and image_path.is_file() else "<em>image not found</em>")
            scores = "<br>".join(f"{_e(label(s))}: {format_number(row[s] * display_scale.get(s, 1.0))}"
                                 for s in scorers)
            cells.append(f"<td>{image}<br>{scores}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="samples">{head}{"".join(rows)}</table>'
