"""The demo's report pieces: the reward-against-step plot, the image grid, the win-rate table and
this run's numbers beside the shipped multi-seed study's (``smpo demo`` writes them; see
:mod:`smpo.world.demo`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from smpo.evaluation.stats import format_interval, win_rate_cell
from smpo.io import atomic_path
from smpo.world.stages import METHOD_NAMES, DemoConfig
from smpo.world.study.rungs import demo_rung


def plot_curves(path: Path, curves: dict[str, dict[int, float]], base_reward: float) -> None:
    """Held-out median reward against training step, one line per method (step 0 is the base)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, curve in curves.items():
        steps = [0, *sorted(curve)]
        ax.plot(steps, [base_reward, *(curve[s] for s in sorted(curve))], marker="o", label=METHOD_NAMES[method])
    ax.axhline(base_reward, color="grey", linestyle=":", label="base")
    ax.set_xlabel("training step (optimizer steps)")
    ax.set_ylabel("held-out median world reward")
    ax.set_title("Miniature world: held-out reward during training")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


GRID_HEADER = 64  # pixels above the images for each column's prompt


def image_grid(path: Path, folders: dict[str, Path], columns: int = 8, scale: int = 3) -> None:
    """One row per model (same prompts and seeds), labelled on the left; each column's prompt on top."""
    import textwrap

    from PIL import Image, ImageDraw

    from smpo.evaluation.manifest import read_manifest

    rows = {name: sorted(read_manifest(folder), key=lambda r: (r.prompt_index, r.image_index))
            for name, folder in folders.items()}
    rows = {name: [r for r in records if r.image_index == 0][:columns] for name, records in rows.items()}
    size = 32 * scale
    label_width = 110
    grid = Image.new("RGB", (label_width + columns * size, GRID_HEADER + len(rows) * size), "white")
    draw = ImageDraw.Draw(grid)
    for c, record in enumerate(next(iter(rows.values()))):
        for k, line in enumerate(textwrap.wrap(record.prompt, 16)[:6]):
            draw.text((label_width + c * size + 2, 2 + 10 * k), line, fill="black")
    for r, (name, records) in enumerate(rows.items()):
        top = GRID_HEADER + r * size
        draw.text((4, top + size // 2 - 6), name, fill="black")
        for c, record in enumerate(records):
            image = Image.open(folders[name] / record.file).convert("RGB").resize((size, size), Image.Resampling.NEAREST)
            grid.paste(image, (label_width + c * size, top))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


def report_table(names: list[str], medians: dict[str, float], means: dict[str, float],
                 rates: Any) -> str:
    """Markdown: median and mean reward per model, and its win rate against every other model."""
    def rate(a: str, b: str) -> str:
        match = rates[(rates.model_a == a) & (rates.model_b == b)]
        if len(match):
            row = match.iloc[0]
            return win_rate_cell(100 * row.win_rate, 100 * row.win_rate_low, 100 * row.win_rate_high)
        match = rates[(rates.model_a == b) & (rates.model_b == a)]
        row = match.iloc[0]
        return win_rate_cell(100 * (1 - row.win_rate), 100 * (1 - row.win_rate_high), 100 * (1 - row.win_rate_low))

    header = "| model | median reward | mean reward | " + " | ".join(f"win rate vs {b} (%)" for b in names) + " |"
    lines = [header, "|" + "---|" * (3 + len(names))]
    for a in names:
        cells = [a, f"{medians[a]:.4f}", f"{means[a]:.4f}"] + ["-" if a == b else rate(a, b) for b in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"



def study_context(cfg: DemoConfig, study: dict[str, Any] | None, medians: dict[str, float], rates: Any
                  ) -> dict[str, Any]:
    """This run's lift and win rate against the base beside the shipped multi-seed study's."""
    lines = ["## This seed beside the multi-seed study", ""]
    if study is None:
        lines.append("No study ships with this installation (`smpo study` makes one).")
        return {"markdown": "\n".join(lines), "rows": []}
    s = study["config"]
    status = f" ({study['status']})" if study.get("status", "finished") != "finished" else ""
    lines += [f"`{study['command']}`{status}: {len(s['seeds'])} seeds, {s['train_steps']} steps of {s['batch_size']} "
              f"pairs, {s['images_per_prompt']} images per held-out prompt, {study['wall_seconds'] / 3600:.1f} h on "
              "2 CPU cores. Held-out median reward lift over the base and win rate against it:", "",
              "| method | this run: lift | this run: win rate | study (tuned): lift, mean [95% CI] | "
              "study: win rate, mean [95% CI] |", "|---|---|---|---|---|"]
    rows = []
    for method in cfg.methods:
        name, rung = METHOD_NAMES[method], demo_rung(method, cfg.smpo_noising)
        match = rates[(rates.model_a == name) & (rates.model_b == "base")]
        win = float(match.iloc[0].win_rate) if len(match) else float("nan")
        row = next((r for r in study["rows"] if r["rung"] == rung and r["setting"] == "tuned"), None)
        lift = medians[name] - medians["base"]
        cells = ["-", "-"] if row is None else [format_interval(row["lift_mean_ci"], 3, sign=True),
                                                format_interval(row["win_rate_mean_ci"], 2)]
        lines.append(f"| {name} | {lift:+.3f} | {win:.2f} | {cells[0]} | {cells[1]} |")
        rows.append({"method": method, "rung": rung, "lift": lift, "win_rate": win, "study": row and {
            k: row[k] for k in ("lift_mean_ci", "win_rate_mean_ci", "learning_rate")}})
    if cfg != replace(DemoConfig(), seed=cfg.seed, methods=cfg.methods):
        lines += ["", "This run's settings differ from the study's defaults: the two are not directly comparable."]
    return {"markdown": "\n".join(lines), "rows": rows}
