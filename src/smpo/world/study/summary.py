"""The shipped summary of a study (``src/smpo/world/study-summary.json``, which ``smpo demo`` reads
for its learning rates) and the README's block, both made from a study's ``study.json``.

``studies/world/summarise.py`` runs :func:`write_summary` on a finished (or partial) study.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from smpo.evaluation.stats import format_interval
from smpo.io import atomic_path, read_json, write_json
from smpo.world.study.rungs import StudyConfig, split_prompts

README_BEGIN, README_END = "<!-- study-summary:begin -->", "<!-- study-summary:end -->"


def summary_of(data: dict[str, Any], *, command: str, wall_seconds: float, status: str) -> dict[str, Any]:
    """What ships of a study: its settings, the chosen rates with every rate's validation lift, and
    every row (per-seed lifts and win rates, intervals, curves, costs); no per-image score."""
    return {"status": status, "command": command, "wall_seconds": wall_seconds, "config": data["config"],
            "chosen": data["chosen"], "rows": data["rows"]}


def readme_block(summary: dict[str, Any]) -> str:
    """The README's table: every rung at its tuned rate, with its cost per step."""
    config = summary["config"]
    prompts = len(split_prompts(StudyConfig(max_prompts=config["max_prompts"]), "held_out"))
    head = (f"What it measured ({summary['status']}; `{summary['command']}`, {summary['wall_seconds'] / 3600:.1f} h "
            f"of wall time on 2 CPU cores in all; mean over seeds [95% t-interval], {prompts} held-out prompts x "
            f"{config['images_per_prompt']} images; the paper-rate rows, the validation tuning, the rows against "
            "compute and the plot are in `docs/world.md`):")
    lines = [head, "",
             "| method (tuned learning rate) | seeds | held-out median lift over base | win rate vs base | "
             "network evals / step (sampling incl.) |",
             "|---|---|---|---|---|"]
    for r in summary["rows"]:
        if r["setting"] != "tuned":
            continue
        lines.append(f"| {r['label']} ({r['learning_rate']:g}) | {len(r['seeds'])} | "
                     f"{format_interval(r['lift_mean_ci'], 3, sign=True)} | "
                     f"{format_interval(r['win_rate_mean_ci'], 2)} | {r['unet_evals_per_step']:,.0f} |")
    return "\n".join(lines) + "\n"


def write_summary(study: str | Path, summary_path: str | Path, readme: str | Path | None, *, command: str,
                  wall_seconds: float, status: str) -> dict[str, Any]:
    """Write the summary of ``study/study.json`` to ``summary_path`` and, when ``readme`` is given,
    replace its block between :data:`README_BEGIN` and :data:`README_END`; return the summary."""
    summary = summary_of(read_json(Path(study) / "study.json"), command=command, wall_seconds=wall_seconds,
                         status=status)
    write_json(summary_path, summary)
    if readme is not None:
        text = Path(readme).read_text()
        pattern = re.compile(re.escape(README_BEGIN) + r"\n.*?" + re.escape(README_END), re.S)
        if not pattern.search(text):
            raise ValueError(f"{readme}: no {README_BEGIN} ... {README_END} block to replace")
        new = pattern.sub(lambda _: README_BEGIN + "\n" + readme_block(summary) + README_END, text)
        with atomic_path(readme) as tmp:
            tmp.write_text(new)
    return summary
