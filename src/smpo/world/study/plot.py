"""The study's plot, ``study.png``: the final lifts with their intervals, and the tuned rows' lift
against training steps, network evaluations and seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from smpo.io import atomic_path
from smpo.world.study.analysis import compute_points, curve_rows
from smpo.world.study.rungs import StudyConfig


def plot_study(path: Path, rows: list[dict[str, Any]], cfg: StudyConfig) -> None:
    """Left: final lift per rung with 95% intervals (paper defaults and tuned). Then the tuned rows'
    lift against training step, against UNet evaluations and against training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(22, 5.5))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    y = np.arange(len(labels))
    for offset, setting, colour in ((-0.18, "paper", "tab:grey"), (0.18, "tuned", "tab:blue")):
        nan = (float("nan"),) * 3
        sel = {r["label"]: r["lift_mean_ci"] for r in rows if r["setting"] == setting}  # a row may be unfinished
        cis = [sel.get(label, nan) for label in labels]
        means = [ci[0] for ci in cis]
        errs = np.array([[ci[0] - ci[1], ci[2] - ci[0]] for ci in cis]).T
        axes[0].barh(y + offset, means, height=0.34, xerr=np.nan_to_num(errs), color=colour, label=setting,
                     capsize=2)
    axes[0].set_yticks(y, labels)
    axes[0].invert_yaxis()
    axes[0].axvline(0, color="black", linewidth=0.8)
    axes[0].set_xlabel("held-out median reward lift over the base (95% CI over seeds)")
    axes[0].legend()
    for r in curve_rows(rows):
        steps, spent, cis = zip(*compute_points(r))
        lifts = [ci[0] for ci in cis]
        axes[1].plot([0, *steps], [0.0, *lifts], marker="o", label=r["label"])
        # Compute on a log axis (online rows spend 20x an offline DPO run's), from the first checkpoint.
        axes[2].plot(spent, lifts, marker="o", label=r["label"])
        axes[3].plot([s * r["seconds_per_step"] for s in steps], lifts, marker="o", label=r["label"])
    axes[2].set_xscale("log")
    axes[3].set_xscale("log")
    axes[1].set_xlabel("training step")
    axes[2].set_xlabel(f"network sample-evaluations (training; online rows: + sampling; {cfg.batch_size} pairs a step)")
    axes[3].set_xlabel("seconds (one CPU thread, median step time; online rows: + sampling)")
    for ax in axes[1:]:
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel("held-out median lift (tuned, mean over seeds)")
    if axes[3].get_legend_handles_labels()[0]:
        axes[3].legend(fontsize=7)
    fig.suptitle(f"Miniature world: Table 3 ladder and baselines ({len(cfg.seeds)} seeds)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
