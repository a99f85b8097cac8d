"""``smpo demo``: the whole SmPO pipeline on the miniature world, on a CPU, in minutes.

Every stage goes through the same code as a real model (no demo-only shortcuts):

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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from smpo.io import atomic_path, prepare_output_dir, write_json
from smpo.world.grammar import split
from smpo.world.model import base_path
from smpo.world.study import demo_rung, format_interval, shipped_summary

METHOD_NAMES = {"smpo": "SmPO", "dpo": "Diffusion-DPO", "kto": "Diffusion-KTO", "mapo": "MaPO", "sft": "SFT"}


@dataclass(frozen=True)
class DemoConfig:
    """The demo's budget. The defaults fit 10 minutes on 2 CPU cores; ``QUICK`` fits 2."""

    pairs: int | None = None  # None: the shipped pair set (2048 pairs); N: make N pairs anew (--seed)
    train_steps: int = 40  # optimizer steps per method
    batch_size: int = 8  # pairs per optimizer step
    learning_rate: float | None = None  # None: each method's rate tuned by the shipped study (not scaled by the batch)
    eval_every: int = 20  # evaluate the held-out reward every N steps (and at the end)
    eval_prompts: int = 93  # held-out prompts used for evaluation (93 = all, the least noisy median)
    images_per_prompt: int = 2  # held-out images per prompt (seeds shared by every model)
    sample_steps: int = 10  # DDIM steps for every sample (pairs and evaluation)
    guidance_scale: float = 3.0  # CFG for every sample
    raters: int = 20
    methods: tuple[str, ...] = ("smpo", "dpo")
    smpo_noising: str = "renoise"  # SmPO's x_t: renoise (the paper), ddim-inversion or forward (ablations)
    seed: int = 0


QUICK = DemoConfig(train_steps=4, batch_size=4, eval_every=2, eval_prompts=12, images_per_prompt=1, sample_steps=6)
FALLBACK_LEARNING_RATE = 3e-5  # a method the shipped study did not tune


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="demo-output", help="output folder (default: demo-output)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--resume", action="store_true",
                        help="continue a stopped demo in --output (same settings): finished stages are kept, "
                             "training continues from its last checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairs, raters, training and sampling")
    parser.add_argument("--quick", action="store_true", help="a smaller run (about 2 minutes) for tests and CI")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods to train (default smpo,dpo; also kto, mapo, sft)")
    parser.add_argument("--base", default=None, help="world pipeline folder (default: the shipped base)")
    parser.add_argument("--smpo-noising", choices=("renoise", "ddim-inversion", "forward"), default=None,
                        help="how SmPO finds x_t (default renoise, the paper's; the others are Table 3 ablations)")
    for name, help_text in (("pairs", "make this many preference pairs anew (default: the shipped set of 2048)"), ("train-steps", "optimizer steps per method"),
                            ("batch-size", "pairs per step"), ("eval-every", "evaluate every N steps"),
                            ("eval-prompts", "held-out prompts to evaluate"),
                            ("images-per-prompt", "held-out images per prompt")):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"{help_text} (overrides the preset)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="one learning rate for every method (default: each method's rate tuned by the shipped study)")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    cfg = replace(QUICK if args.quick else DemoConfig(), seed=args.seed)
    if args.methods:
        cfg = replace(cfg, methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()))
    for name in ("pairs", "train_steps", "batch_size", "eval_every", "eval_prompts", "images_per_prompt",
                 "learning_rate", "smpo_noising"):
        if getattr(args, name) is not None:
            cfg = replace(cfg, **{name: getattr(args, name)})
    unknown = sorted(set(cfg.methods) - set(METHOD_NAMES))
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(METHOD_NAMES)}")
    return cfg


# ---------------------------------------------------------------------------------------------
# Stages


def make_pairs(base: Path, out: Path, cfg: DemoConfig) -> Path:
    """Stage 1: the shipped pair set (``smpo.world.pairset``, read as a downloaded dataset), or
    with ``cfg.pairs`` a new one of that many pairs (seeded by ``cfg.seed``; kept if already
    written: the shard is written atomically)."""
    from smpo.world.pairset import make_pair_set, pair_set_path
    from smpo.world.raters import PAIRS_FILE

    if cfg.pairs is None:
        return pair_set_path()
    if (out / PAIRS_FILE).is_file():
        return out
    return make_pair_set(base, out, pairs=cfg.pairs, seed=cfg.seed, raters=cfg.raters, progress=True)


def label(pairs: Path, out: Path, *, progress: bool = False) -> dict[str, Any]:
    """Stage 2: ``smpo label`` with the world reward model (human ties kept: SmPO uses every pair);
    an unfinished labelling resumes, a finished one is read back."""
    from smpo.data.label import LABELS_FILE, LabelSummary, label_pairs
    from smpo.io import read_json

    if (out / LABELS_FILE).is_file():
        return asdict(LabelSummary.from_dict(read_json(out / LABELS_FILE)))

    summary = label_pairs(pairs, out, scorer="world", keep_ties=True, progress=progress)
    return asdict(summary)


def train_config(method: str, base: Path, dataset: Path, run_dir: Path, cfg: DemoConfig,
                 objective: dict[str, Any] | None = None, resume: bool = False, progress: bool = False,
                 unet: Path | None = None):
    """The ``smpo train`` config of one method: the paper's objective settings (method defaults:
    beta, gamma 10, ReNoise with a 5-step grid for SmPO), the demo's budget; ``unet``: start from
    this UNet folder instead of the base's."""
    from smpo.objective import ObjectiveConfig
    from smpo.train.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig

    return TrainConfig(
        model=ModelConfig(pretrained=str(base), finetune="full", unet=None if unet is None else str(unet)),
        # No horizontal flips: they would turn "on the left" images into right ones.
        data=DataConfig(dataset=str(dataset), random_flip=False),
        objective=ObjectiveConfig(method=method, **(objective or {})),
        optim=OptimConfig(learning_rate=cfg.learning_rate, scale_lr=False, warmup_steps=0,
                          batch_size=cfg.batch_size, gradient_accumulation_steps=1, max_steps=cfg.train_steps),
        run=RunConfig(output_dir=str(run_dir), seed=cfg.seed, mixed_precision="no", checkpoint_every=cfg.eval_every,
                      resume=resume,
                      keep_checkpoints=cfg.train_steps // max(cfg.eval_every, 1) + 1, progress=progress),
    ).validate()


def checkpoint_unet(checkpoint: Path, base: Path, out: Path) -> Path:
    """A training checkpoint's policy weights as a UNet folder that ``smpo generate --unet`` loads
    (kept if already written: it is written atomically)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    if out.is_dir():
        return out

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{checkpoint}: no model.safetensors (not a full fine-tuning checkpoint)")
    unet.load_state_dict(load_file(weights))
    with atomic_path(out) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
    return out


def score_images(base: Path, unet: Path | None, prompts: list[str], out: Path, cfg: DemoConfig, scorer: Any,
                 name: str, *, images_per_prompt: int = 1, progress: bool = False) -> list[float]:
    """Sample the prompts (``smpo generate``'s API; image ``i`` of prompt ``p`` has the same seed for
    every model), score them (``smpo evaluate``'s API); return the rewards in (prompt, image) order."""
    from smpo.evaluation.evaluate import evaluate_folder
    from smpo.evaluation.generate import generate_images
    from smpo.evaluation.pipelines import load_pipeline

    pipe, _ = load_pipeline(base, unet=unet)
    generate_images(pipe, prompts, out, guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.sample_steps,
                    images_per_prompt=images_per_prompt, seed=cfg.seed, seed_per_prompt=True, batch_size=32,
                    settings={"model": str(base), "unet": str(unet) if unet else None, "name": name},
                    progress=progress)
    table, _ = evaluate_folder(out, ["world"], loaded={"world": scorer}, num_resamples=200, seed=cfg.seed,
                               progress=False)
    table = table.sort_values(["prompt_index", "image_index"])
    return [float(v) for v in table["world"]]


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


# ---------------------------------------------------------------------------------------------
# Report


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
            return f"{100 * row.win_rate:.1f} [{100 * row.win_rate_low:.1f}, {100 * row.win_rate_high:.1f}]"
        match = rates[(rates.model_a == b) & (rates.model_b == a)]
        row = match.iloc[0]
        return f"{100 * (1 - row.win_rate):.1f} [{100 * (1 - row.win_rate_high):.1f}, {100 * (1 - row.win_rate_low):.1f}]"

    header = "| model | median reward | mean reward | " + " | ".join(f"win rate vs {b} (%)" for b in names) + " |"
    lines = [header, "|" + "---|" * (3 + len(names))]
    for a in names:
        cells = [a, f"{medians[a]:.4f}", f"{means[a]:.4f}"] + ["-" if a == b else rate(a, b) for b in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


SETTINGS_FILE = "demo.json"


def check_settings(out: Path, settings: dict[str, Any], *, resume: bool) -> None:
    """Write the run's settings; on ``resume``, refuse a folder made with other settings."""
    path = out / SETTINGS_FILE
    if resume and path.is_file():
        old = json.loads(path.read_text())
        changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
        if changed:
            raise ValueError(f"{out} was made with other settings ({'; '.join(changed)}); rerun with those "
                             "settings, or pass --overwrite to start again")
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
        objective = {"noising": cfg.smpo_noising} if method == "smpo" else None
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
        cells = ["-", "-"] if row is None else [format_interval(row["lift_mean_ci"]),
                                                format_interval(row["win_rate_mean_ci"], 2, sign=False)]
        lines.append(f"| {name} | {lift:+.3f} | {win:.2f} | {cells[0]} | {cells[1]} |")
        rows.append({"method": method, "rung": rung, "lift": lift, "win_rate": win, "study": row and {
            k: row[k] for k in ("lift_mean_ci", "win_rate_mean_ci", "learning_rate")}})
    if cfg != replace(DemoConfig(), seed=cfg.seed, methods=cfg.methods):
        lines += ["", "This run's settings differ from the study's defaults: the two are not directly comparable."]
    return {"markdown": "\n".join(lines), "rows": rows}


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    run_demo(args.output, cfg, base=args.base, overwrite=args.overwrite, resume=args.resume)
    return 0


def load_report(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "report.json").read_text())
