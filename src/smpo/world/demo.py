"""``smpo demo``: the whole SmPO pipeline on the miniature world, on a CPU, in minutes.

Every stage goes through the same code as a real model (no demo-only shortcuts; the stages the
study shares are in ``smpo.world.stages``, the report's pieces in ``smpo.world.demo_report``):

1. pairs: the shipped base model (an SD1.5-family pipeline) samples two images for each of some
   TRAIN prompts, and simulated raters label them (``smpo.world.raters``) into a Pick-a-Pic-schema
   parquet dataset (``pairs/``);
2. labels: ``smpo.data.label.label_pairs`` scores every image with the world's reward model
   (``world``, PickScore's part) and writes the winners and smoothed ``p_win`` (``labelled/``);
3. training: ``smpo.train.train`` runs each method (SmPO and Diffusion-DPO by default) for the same
   steps, batch and learning rate, from the same base (``runs/<method>/``). Diffusion-DPO uses the
   raters' binary labels with ties dropped, SmPO the reward model's smoothed labels, as in the paper;
4. evaluation: ``smpo.evaluation.generate`` samples the HELD-OUT prompts (one image per prompt,
   the same seeds for every model) with the base and with each method at every checkpoint, and
   ``smpo.evaluation.evaluate`` scores them with the world's reward model (``eval/``);
5. comparison: ``smpo.evaluation.compare`` writes the Table-2-style tables (``compare/``); the demo
   adds ``report.md`` / ``report.json`` (median reward, win rates against the base and against each
   other), ``reward_vs_step.png`` and ``grid.png`` (base and each method, same prompts and seeds).

One run is one seed: whether SmPO beats Diffusion-DPO is a question for several seeds
(``--seed``), with intervals; the demo reports what it measured and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from smpo.io import atomic_path, prepare_output_dir, read_json, refuse_changed_settings, write_json
from smpo.options import add_dataclass_arguments, check_known, dataclass_from_args
from smpo.world.demo_report import image_grid, plot_curves, report_table, study_context
from smpo.world.grammar import split
from smpo.world.model import base_path
from smpo.world.stages import (
    METHOD_NAMES,
    SMPO_NOISINGS,
    DemoConfig,
    checkpoint_unet,
    label,
    make_pairs,
    method_objective,
    score_images,
    train_config,
)
from smpo.world.study.rungs import demo_rung, shipped_summary

QUICK = DemoConfig(train_steps=4, batch_size=4, eval_every=2, eval_prompts=12, images_per_prompt=1, sample_steps=6)
FALLBACK_LEARNING_RATE = 3e-5  # a method the shipped study did not tune
CHOICES = {"smpo_noising": SMPO_NOISINGS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="demo-output", help="output folder (default: demo-output)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--resume", action="store_true",
                        help="continue a stopped demo in --output (same settings): finished stages are kept, "
                             "training continues from its last checkpoint")
    parser.add_argument("--quick", action="store_true", help="a smaller run (about 2 minutes) for tests and CI; "
                        "the options below override it")
    parser.add_argument("--base", default=None, help="world pipeline folder (default: the shipped base)")
    add_dataclass_arguments(parser.add_argument_group("budget"), DemoConfig, choices=CHOICES)


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """``--quick`` or the defaults, overlaid with the budget options given."""
    cfg = dataclass_from_args(DemoConfig, args, base=QUICK if args.quick else DemoConfig(), choices=CHOICES)
    check_known("--methods", cfg.methods, list(METHOD_NAMES))
    return cfg


# ---------------------------------------------------------------------------------------------
# Stages (the shared ones are in smpo.world.stages)


def generate_and_evaluate(base: Path, unet: Path | None, prompts: list[str], out: Path, cfg: DemoConfig,
                          scorer: Any, name: str) -> float:
    """Sample and score the held-out prompts (with a progress bar); return the median reward."""
    return float(np.median(score_images(base, unet, prompts, out, cfg, scorer, name,
                                        images_per_prompt=cfg.images_per_prompt, progress=True)))


def train_and_track(method: str, base: Path, dataset: Path, out: Path, prompts: list[str], cfg: DemoConfig,
                    scorer: Any, objective: dict[str, Any] | None = None, resume: bool = False) -> dict[int, float]:
    """Stage 3 and 4 for one method: train, then the held-out median reward at every checkpoint
    (``resume``: continue the run's last checkpoint; images and scores already made are kept)."""
    from smpo.train.checkpoint import list_checkpoints
    from smpo.train.loop import train

    run_dir = out / "runs" / method
    if not (resume and (run_dir / "final").is_dir()):  # the export is written last, atomically
        train(train_config(method, base, dataset, run_dir, cfg, objective, resume=resume, progress=True))
    curve = {}
    for checkpoint in list_checkpoints(run_dir):
        step = int(checkpoint.name.split("-")[-1])
        unet = checkpoint_unet(checkpoint, base, out / "unets" / method / checkpoint.name)
        curve[step] = generate_and_evaluate(base, unet, prompts, out / "eval" / f"{method}-{checkpoint.name}", cfg,
                                            scorer, f"{method} step {step}")
    return curve


SETTINGS_FILE = "demo.json"


def check_settings(out: Path, settings: dict[str, Any], *, resume: bool) -> None:
    """Write the run's settings; on ``resume``, refuse a folder made with other settings."""
    path = out / SETTINGS_FILE
    if resume and path.is_file():
        refuse_changed_settings(out, read_json(path), settings, what="a demo")
        return
    write_json(path, settings)


def run_demo(output: str | Path, cfg: DemoConfig = DemoConfig(), *, base: str | Path | None = None,
             overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Run every stage into ``output``; return the report's data (also in ``report.json``).

    ``resume`` continues a stopped run in ``output`` made with the same settings: finished stages
    are kept, training continues from the last checkpoint, only missing images are made and scored.
    """
    import pandas as pd

    from smpo.evaluation.compare import compare
    from smpo.world.reward import load_world_scorer

    if overwrite and resume:
        raise ValueError("--overwrite and --resume exclude each other")
    out = prepare_output_dir(output, overwrite=overwrite, resume=resume)
    base = Path(base) if base is not None else base_path()
    check_settings(out, {**json.loads(json.dumps(asdict(cfg))), "base": str(base)}, resume=resume)
    scorer = load_world_scorer()
    prompts = split("held_out")[: cfg.eval_prompts]
    timings: dict[str, float] = {}
    start = clock = time.time()

    def lap(stage: str) -> None:
        nonlocal clock
        timings[stage] = round(time.time() - clock, 1)
        clock = time.time()
        print(f"smpo demo: {stage} done ({timings[stage]:.0f} s)", flush=True)

    pairs = make_pairs(base, out / "pairs", cfg)
    lap("pairs")
    labels = label(pairs, out / "labelled", progress=True)
    lap("labels")
    base_eval = out / "eval" / "base"
    base_reward = generate_and_evaluate(base, None, prompts, base_eval, cfg, scorer, "base")
    lap("base evaluation")
    curves = {}
    study = shipped_summary()
    rates_used = {m: learning_rate_for(m, cfg, study) for m in cfg.methods}
    for method in cfg.methods:
        objective = method_objective(method, cfg.smpo_noising)
        curves[method] = train_and_track(method, base, out / "labelled", out, prompts,
                                         replace(cfg, learning_rate=rates_used[method]), scorer, objective,
                                         resume=resume)
        lap(f"{method} training and evaluation")

    finals = {METHOD_NAMES[m]: out / "eval" / f"{m}-step-{max(curves[m]):06d}" for m in cfg.methods}
    folders = {**finals, "base": base_eval}
    files = compare(list(folders.values()), out / "compare", names=list(folders), scorers=["world"],
                    num_resamples=1000, seed=cfg.seed, overwrite=True)
    rates = pd.read_csv(files["winrates"])
    names = list(folders)
    tables = {n: pd.read_parquet(Path(f) / "evaluation" / "scores.parquet") for n, f in folders.items()}
    medians = {n: float(t["world"].median()) for n, t in tables.items()}
    means = {n: float(t["world"].mean()) for n, t in tables.items()}
    plot_curves(out / "reward_vs_step.png", curves, base_reward)
    image_grid(out / "grid.png", {"base": base_eval, **finals})
    lap("report")
    timings["total"] = round(time.time() - start, 1)

    table = report_table(names, medians, means, rates)
    context = study_context(cfg, study, medians, rates)
    data = {
        "config": asdict(cfg), "base": str(base), "held_out_prompts": len(prompts), "pairs": cfg.pairs,
        "labels": {k: labels[k] for k in ("pairs", "ties", "score_min", "score_max", "p_win_quantiles", "agreement")},
        "median_reward": medians, "mean_reward": means,
        "reward_vs_step": {METHOD_NAMES[m]: {"0": base_reward, **{str(s): r for s, r in c.items()}}
                           for m, c in curves.items()},
        "win_rates": rates.to_dict(orient="records"), "learning_rates": rates_used, "study": context,
        "seconds": timings,
    }
    write_json(out / "report.json", data)
    text = "\n".join([
        "# smpo demo: the miniature world",
        "",
        f"Base: `{base}`. Pairs: `{pairs}` ({labels['pairs']} pairs on train prompts, images from several "
        f"generators (`model_0` / `model_1`), rated by simulated raters, {labels['ties']} ties), labelled by "
        f"the world reward model. Each method trained {cfg.train_steps} steps of {cfg.batch_size} pairs at its "
        "learning rate (" + ", ".join(f"{METHOD_NAMES[m]} {r:g}" for m, r in rates_used.items())
        + ("; tuned on validation prompts by the shipped study" if cfg.learning_rate is None else "")
        + f"; SmPO's x_t: {cfg.smpo_noising}). Evaluation: {len(prompts)} held-out prompts x {cfg.images_per_prompt} "
        f"images, {cfg.sample_steps} DDIM steps, CFG {cfg.guidance_scale:g}, seed {cfg.seed}.",
        "",
        "World reward on the held-out prompts (win rate: share of prompts where the row's model's image "
        "scores higher, ties one half; 95% bootstrap interval over prompts):",
        "",
        table,
        "One seed is one draw: compare methods over several seeds (`--seed`) before concluding.",
        "",
        context["markdown"],
        "",
        "Held-out median reward by step: " + "; ".join(
            f"{METHOD_NAMES[m]}: " + ", ".join(f"{s}: {r:.4f}" for s, r in [(0, base_reward), *sorted(c.items())])
            for m, c in curves.items()),
        "",
        "Files: `reward_vs_step.png`, `grid.png` (rows: base, " + ", ".join(finals) + "; same prompts and seeds), "
        "`compare/` (Table-2-style tables, `report.html`), `report.json`.",
        "",
        "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
        "",
    ])
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(text)
    print(text)
    return data


def learning_rate_for(method: str, cfg: DemoConfig, study: dict[str, Any] | None) -> float:
    """``cfg.learning_rate`` if set, else the method's rate tuned by the shipped study (on
    validation prompts), else ``FALLBACK_LEARNING_RATE``."""
    if cfg.learning_rate is not None:
        return float(cfg.learning_rate)
    rung = demo_rung(method, cfg.smpo_noising)
    if study and rung in study["chosen"]:
        return float(study["chosen"][rung]["learning_rate"])
    return FALLBACK_LEARNING_RATE


def run(args: argparse.Namespace) -> int:
    """``smpo demo``."""
    cfg = config_from_args(args)
    run_demo(args.output, cfg, base=args.base, overwrite=args.overwrite, resume=args.resume)
    return 0
