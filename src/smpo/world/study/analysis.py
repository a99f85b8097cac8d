"""The study's analysis: the tuning's choice of learning rates, the report's rows (mean over seeds
with a 95% t-interval) and their markdown tables.

Nothing here runs a job: every function reads the jobs' results (``results/<job>.json``, by job
name) and returns numbers or text.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from smpo.evaluation.stats import format_interval, t_interval, win_rate
from smpo.world.study.rungs import RUNG_BY_KEY, Job, StudyConfig, split_prompts


def lift_and_win(scores: list[float], base_scores: list[float]) -> tuple[float, float]:
    """Median reward minus the base's, and the paired win rate against the base (ties one half)."""
    return float(np.median(scores) - np.median(base_scores)), win_rate(scores, base_scores)


def choose_learning_rates(cfg: StudyConfig, results: dict[str, dict[str, Any]],
                          grids: dict[str, list[float]] | None = None) -> dict[str, dict[str, Any]]:
    """Per rung: the validation lift of every rate tried (``grids[rung]``, default ``cfg.lr_grid``;
    mean over tuning seeds) and the chosen one (the highest mean lift; the smaller rate on an exact
    tie), with ``edge``: ``"low"``/``"high"`` where the chosen rate is the smallest/largest tried."""
    chosen = {}
    for rung in cfg.rungs:
        rates = sorted((grids or {}).get(rung, cfg.lr_grid))
        table = {}
        for lr in rates:
            lifts = []
            for seed in cfg.tune_seeds:
                run = results[Job(rung, lr, seed, "validation").name]
                base = results[Job("base", 0.0, seed, "validation").name]
                final = run["scores"][max(run["scores"], key=int)]
                lifts.append(lift_and_win(final, base["scores"]["0"])[0])
            table[f"{lr:g}"] = {"lifts": lifts, "mean": float(np.mean(lifts))}
        best = max(rates, key=lambda lr: (table[f"{lr:g}"]["mean"], -lr))
        edge = "low" if best == rates[0] else "high" if best == rates[-1] else None
        chosen[rung] = {"learning_rate": best, "validation": table, "edge": edge}
    return chosen


def next_rate(lr: float, direction: int) -> float:
    """The rate half a decade below (``direction=-1``) or above (``+1``) ``lr`` on the 1-3-10 ladder
    (1e-5 -> 3e-6 -> 1e-6; 1e-4 -> 3e-4 -> 1e-3)."""
    exponent = int(np.floor(np.log10(lr) + 1e-9))
    step = 2 * exponent + (1 if lr / 10.0 ** exponent >= 2 else 0) + direction  # 1e-5 is 2*(-5), 3e-5 one more
    return float(f"{(3 if step % 2 else 1)}e{step // 2}")


def extend_grids(cfg: StudyConfig, chosen: dict[str, dict[str, Any]], grids: dict[str, list[float]]) -> list[str]:
    """Add to ``grids`` the next rate past each rung's chosen edge, within ``cfg.lr_bounds``; the rungs extended."""
    low, high = cfg.lr_bounds
    extended = []
    for rung, c in chosen.items():
        if c["edge"] is None or len(grids[rung]) < 2:
            continue
        lr = next_rate(c["learning_rate"], -1 if c["edge"] == "low" else 1)
        if low * (1 - 1e-9) <= lr <= high * (1 + 1e-9) and lr not in grids[rung]:
            grids[rung] = sorted([*grids[rung], lr])
            extended.append(rung)
    return extended


def evals_spent(run: dict[str, Any], step: int) -> float:
    """The network sample-evaluations a run had spent by the end of training step ``step``: its
    training's and, for an online run, the sampling of every round begun by then (a round samples
    first, so at a round's end its sampling is in)."""
    training = float(sum(run["unet_evals"][:step]))
    rounds = run.get("online_rounds", [])
    started = [r for k, r in enumerate(rounds) if k == 0 or rounds[k - 1]["steps"] < step]
    return training + sum(r["sampling_network_evals"] for r in started)


def summarise(cfg: StudyConfig, results: dict[str, dict[str, Any]], chosen: dict[str, dict[str, Any]]
              ) -> list[dict[str, Any]]:
    """One row per (rung, setting): lift and win rate per seed, mean and 95% t-interval, the curve."""
    rows = []
    for rung in cfg.rungs:
        settings = [("paper", cfg.paper_lr), ("tuned", chosen[rung]["learning_rate"])]
        for setting, lr in settings:
            lifts, wins, curves, evals, sampling, seconds, seeds, spent = [], [], [], [], [], [], [], []
            for seed in cfg.seeds:
                run = results.get(Job(rung, lr, seed, "held_out").name)
                base_run = results.get(Job("base", 0.0, seed, "held_out").name)
                if run is None or base_run is None:  # not finished (a study reported early)
                    continue
                seeds.append(seed)
                base = base_run["scores"]["0"]
                final = run["scores"][max(run["scores"], key=int)]
                lift, win = lift_and_win(final, base)
                lifts.append(lift)
                wins.append(win)
                curves.append({int(s): lift_and_win(v, base)[0] for s, v in run["scores"].items()})
                spent.append({int(s): evals_spent(run, int(s)) for s in run["scores"]})
                # Online rows: their sampling, spread over the steps it fed (exact at each round's end).
                steps_run = len(run["unet_evals"])
                evals.append(float(np.mean(run["unet_evals"])) + run.get("sampling_network_evals", 0) / steps_run)
                sampling.append(run.get("sampling_network_evals", 0) / steps_run)
                seconds.append(float(np.median(run["step_seconds"])) + run.get("sampling_seconds", 0.0) / steps_run)
            if not seeds:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            rows.append({
                "rung": rung, "label": RUNG_BY_KEY[rung].label, "setting": setting, "learning_rate": lr,
                "seeds": seeds, "lift": lifts, "win_rate": wins,
                "lift_mean_ci": t_interval(lifts), "win_rate_mean_ci": t_interval(wins),
                "curve": {s: t_interval([c[s] for c in curves]) for s in steps},
                "network_evals_at": {s: float(np.mean([e[s] for e in spent])) for s in steps},
                "unet_evals_per_step": float(np.mean(evals)), "seconds_per_step": float(np.median(seconds)),
                "sampling_evals_per_step": float(np.mean(sampling)),
            })
    return rows


def table_markdown(rows: list[dict[str, Any]], cfg: StudyConfig) -> str:
    """The report's table: one row per rung and setting (one row where the tuned rate is the paper's)."""
    lines = ["| rung | setting | learning rate | seeds | held-out median lift over base | win rate vs base | "
             "network evals / step (sampling incl.) | s / step (1 thread) |",
             "|---|---|---|---|---|---|---|---|"]
    tuned_rates = {r["rung"]: r["learning_rate"] for r in rows if r["setting"] == "tuned"}
    for r in rows:
        setting = r["setting"]
        if tuned_rates.get(r["rung"]) == r["learning_rate"]:  # the same runs: one row
            if setting == "paper":
                continue
            setting = "tuned = paper" if r["learning_rate"] == cfg.paper_lr else setting
        lines.append(f"| {r['label']} | {setting} | {r['learning_rate']:g} | {len(r['seeds'])} | "
                     f"{format_interval(r['lift_mean_ci'], 3, sign=True)} | "
                     f"{format_interval(r['win_rate_mean_ci'], 2)} | {r['unet_evals_per_step']:.0f} | "
                     f"{r['seconds_per_step']:.2f} |")
    return "\n".join(lines) + "\n"


def curve_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tuned rows evaluated at more than one checkpoint (``StudyConfig.curve_rungs``)."""
    return [r for r in rows if r["setting"] == "tuned" and len(r["curve"]) >= 2]


def compute_points(row: dict[str, Any]) -> list[tuple[int, float, tuple[float, float, float]]]:
    """A row's curve as (training step, network sample-evaluations spent by then, mean over seeds
    (:func:`evals_spent`), lift [95% CI]), by step (steps are strings in a ``study.json`` read back)."""
    spent = {int(s): e for s, e in row["network_evals_at"].items()}
    return [(int(s), spent[int(s)], tuple(ci)) for s, ci in sorted(row["curve"].items(), key=lambda kv: int(kv[0]))]


def compute_markdown(rows: list[dict[str, Any]]) -> str:
    """The tuned rows evaluated at every checkpoint, their held-out lift against the network
    evaluations spent (online rows: sampling included): the rows compared at equal compute."""
    lines = ["| rung | step | network evals spent (sampling incl.) | held-out median lift over base |",
             "|---|---|---|---|"]
    for r in curve_rows(rows):
        for step, evals, ci in compute_points(r):
            lines.append(f"| {r['label']} | {step} | {evals:,.0f} | {format_interval(ci, 3, sign=True)} |")
    return "\n".join(lines) + "\n"


def tuning_markdown(cfg: StudyConfig, chosen: dict[str, dict[str, Any]]) -> str:
    """The tuning's table: the validation lift of every rate each rung tried (blank where a rung did
    not try it), and the chosen rate (marked where it still lies at an edge: the grid's bound)."""
    rates = sorted({float(lr) for c in chosen.values() for lr in c["validation"]})
    head = "| rung | " + " | ".join(f"lr {lr:g}" for lr in rates) + " | chosen |"
    lines = [head, "|---|" + "---|" * (len(rates) + 1)]
    for rung, c in chosen.items():
        cells = [f"{c['validation'][f'{lr:g}']['mean']:+.4f}" if f"{lr:g}" in c["validation"] else ""
                 for lr in rates]
        mark = f" (at the {c['edge']} bound)" if c.get("edge") else ""
        lines.append(f"| {RUNG_BY_KEY[rung].label} | " + " | ".join(cells) + f" | {c['learning_rate']:g}{mark} |")
    return "\n".join(lines) + "\n"


def report_markdown(cfg: StudyConfig, data: dict[str, Any], table: str) -> str:
    """``report.md``: the protocol's settings, the report table and the tuning table."""
    held_out = len(split_prompts(cfg, "held_out"))
    validation = len(split_prompts(cfg, "validation"))
    return "\n".join([
        "# smpo study: the ablation ladder in the miniature world",
        "",
        f"Budget (every rung): {cfg.train_steps} steps of {cfg.batch_size} pairs, full fine-tuning, from the "
        f"shipped base, on the labelled pair set `{data['dataset']}`. Learning rates tuned from the grid "
        f"{', '.join(f'{lr:g}' for lr in cfg.lr_grid)}, extended past an edge where a rung's best lay on it "
        f"(within {cfg.lr_bounds[0]:g}-{cfg.lr_bounds[1]:g}), by the validation median lift ({validation} prompts x "
        f"{cfg.validation_images_per_prompt} images, seeds {', '.join(map(str, cfg.tune_seeds))}); 'paper' rows "
        f"use learning rate {cfg.paper_lr:g}. Reported on {held_out} held-out prompts x {cfg.images_per_prompt} "
        f"images, seeds {', '.join(map(str, cfg.seeds))} (mean over seeds [95% t-interval]); sampling "
        f"{cfg.sample_steps} DDIM steps, CFG {cfg.guidance_scale:g}.",
        "",
        table,
        "Held-out lift against the compute spent (tuned rows scored at every checkpoint):",
        "",
        compute_markdown(data["rows"]),
        "Validation lift per learning rate (mean over tuning seeds):",
        "",
        tuning_markdown(cfg, data["chosen"]),
        "Files: `study.json` (every value), `table.md`, `study.png`, `results/` (one file per run).",
        "",
    ])
