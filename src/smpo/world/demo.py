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

METHOD_NAMES = {"smpo": "SmPO", "dpo": "Diffusion-DPO", "kto": "Diffusion-KTO", "mapo": "MaPO", "sft": "SFT"}


@dataclass(frozen=True)
class DemoConfig:
    """The demo's budget. The defaults fit 10 minutes on 2 CPU cores; ``QUICK`` fits 2."""

    pairs: int = 256  # preference pairs sampled from the base (two images per train prompt)
    train_steps: int = 60  # optimizer steps per method
    batch_size: int = 8  # pairs per optimizer step
    learning_rate: float = 3e-5  # the same for every method (not scaled by the batch)
    eval_every: int = 20  # evaluate the held-out reward every N steps (and at the end)
    eval_prompts: int = 93  # held-out prompts used for evaluation (one image each; 93 = all, the least noisy median)
    sample_steps: int = 10  # DDIM steps for every sample (pairs and evaluation)
    guidance_scale: float = 3.0  # CFG for every sample
    raters: int = 20
    methods: tuple[str, ...] = ("smpo", "dpo")
    smpo_noising: str = "renoise"  # SmPO's x_t: renoise (the paper), ddim-inversion or forward (ablations)
    seed: int = 0


QUICK = DemoConfig(pairs=48, train_steps=4, batch_size=4, eval_every=2, eval_prompts=12, sample_steps=6)


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
    for name, help_text in (("pairs", "preference pairs"), ("train-steps", "optimizer steps per method"),
                            ("batch-size", "pairs per step"), ("eval-every", "evaluate every N steps"),
                            ("eval-prompts", "held-out prompts to evaluate")):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"{help_text} (overrides the preset)")
    parser.add_argument("--learning-rate", type=float, default=None, help="learning rate (overrides the preset)")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    cfg = replace(QUICK if args.quick else DemoConfig(), seed=args.seed)
    if args.methods:
        cfg = replace(cfg, methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()))
    for name in ("pairs", "train_steps", "batch_size", "eval_every", "eval_prompts", "learning_rate", "smpo_noising"):
        if getattr(args, name) is not None:
            cfg = replace(cfg, **{name: getattr(args, name)})
    unknown = sorted(set(cfg.methods) - set(METHOD_NAMES))
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(METHOD_NAMES)}")
    return cfg


# ---------------------------------------------------------------------------------------------
# Stages


def pair_prompts(count: int, seed: int) -> list[str]:
    """``count`` train prompts in a seeded order (cycling through the train split if needed)."""
    train = split("train")
    order = np.random.default_rng(seed).permutation(len(train))
    return [train[order[i % len(train)]] for i in range(count)]


def make_pairs(base: Path, out: Path, cfg: DemoConfig) -> Path:
    """Stage 1: sample two images per prompt with the base, let the raters label them (kept if
    already written: the shard is written atomically)."""
    from smpo.world.model import load_world_pipeline
    from smpo.world.raters import PAIRS_FILE, build_pair_dataset

    if (out / PAIRS_FILE).is_file():
        return out

    pipe = load_world_pipeline(base)
    return build_pair_dataset(pipe, out, pair_prompts(cfg.pairs, cfg.seed), seed=cfg.seed, raters=cfg.raters,
                              num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale)


def label(pairs: Path, out: Path) -> dict[str, Any]:
    """Stage 2: ``smpo label`` with the world reward model (human ties kept: SmPO uses every pair);
    an unfinished labelling resumes, a finished one is read back."""
    from smpo.data.label import LABELS_FILE, LabelSummary, label_pairs
    from smpo.io import read_json

    if (out / LABELS_FILE).is_file():
        return asdict(LabelSummary.from_dict(read_json(out / LABELS_FILE)))

    summary = label_pairs(pairs, out, scorer="world", keep_ties=True, progress=False)
    return asdict(summary)


def train_config(method: str, base: Path, dataset: Path, run_dir: Path, cfg: DemoConfig,
                 objective: dict[str, Any] | None = None, resume: bool = False):
    """The ``smpo train`` config of one method: the paper's objective settings (method defaults:
    beta, gamma 10, ReNoise with a 5-step grid for SmPO), the demo's budget."""
    from smpo.objective import ObjectiveConfig
    from smpo.train.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig

    return TrainConfig(
        model=ModelConfig(pretrained=str(base), finetune="full"),
        # No horizontal flips: they would turn "on the left" images into right ones.
        data=DataConfig(dataset=str(dataset), random_flip=False),
        objective=ObjectiveConfig(method=method, **(objective or {})),
        optim=OptimConfig(learning_rate=cfg.learning_rate, scale_lr=False, warmup_steps=0,
                          batch_size=cfg.batch_size, gradient_accumulation_steps=1, max_steps=cfg.train_steps),
        run=RunConfig(output_dir=str(run_dir), seed=cfg.seed, mixed_precision="no", checkpoint_every=cfg.eval_every,
                      resume=resume,
                      keep_checkpoints=cfg.train_steps // max(cfg.eval_every, 1) + 1, progress=False),
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


def generate_and_evaluate(base: Path, unet: Path | None, prompts: list[str], out: Path, cfg: DemoConfig,
                          scorer: Any, name: str) -> float:
    """Sample the held-out prompts (``smpo generate``'s API), score them (``smpo evaluate``'s API);
    return the median reward."""
    from smpo.evaluation.evaluate import evaluate_folder
    from smpo.evaluation.generate import generate_images
    from smpo.evaluation.pipelines import load_pipeline

    pipe, _ = load_pipeline(base, unet=unet)
    generate_images(pipe, prompts, out, guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.sample_steps,
                    seed=cfg.seed, seed_per_prompt=True, batch_size=32,
                    settings={"model": str(base), "unet": str(unet) if unet else None, "name": name},
                    progress=False)
    table, _ = evaluate_folder(out, ["world"], loaded={"world": scorer}, num_resamples=200, seed=cfg.seed,
                               progress=False)
    return float(table["world"].median())


def train_and_track(method: str, base: Path, dataset: Path, out: Path, prompts: list[str], cfg: DemoConfig,
                    scorer: Any, objective: dict[str, Any] | None = None, resume: bool = False) -> dict[int, float]:
    """Stage 3 and 4 for one method: train, then the held-out median reward at every checkpoint
    (``resume``: continue the run's last checkpoint; images and scores already made are kept)."""
    from smpo.train.checkpoint import list_checkpoints
    from smpo.train.loop import train

    run_dir = out / "runs" / method
    if not (resume and (run_dir / "final").is_dir()):  # the export is written last, atomically
        train(train_config(method, base, dataset, run_dir, cfg, objective, resume=resume))
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


def image_grid(path: Path, folders: dict[str, Path], columns: int = 8, scale: int = 3) -> None:
    """One row per model (same prompts and seeds), labelled on the left."""
    from PIL import Image, ImageDraw

    from smpo.evaluation.manifest import read_manifest

    rows = {name: sorted(read_manifest(folder), key=lambda r: r.prompt_index)[:columns]
            for name, folder in folders.items()}
    size = 32 * scale
    label_width = 110
    grid = Image.new("RGB", (label_width + columns * size, len(rows) * size), "white")
    draw = ImageDraw.Draw(grid)
    for r, (name, records) in enumerate(rows.items()):
        draw.text((4, r * size + size // 2 - 6), name, fill="black")
        for c, record in enumerate(records):
            image = Image.open(folders[name] / record.file).convert("RGB").resize((size, size), Image.Resampling.NEAREST)
            grid.paste(image, (label_width + c * size, r * size))
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
    labels = label(pairs, out / "labelled")
    lap("labels")
    base_eval = out / "eval" / "base"
    base_reward = generate_and_evaluate(base, None, prompts, base_eval, cfg, scorer, "base")
    lap("base evaluation")
    curves = {}
    for method in cfg.methods:
        objective = {"noising": cfg.smpo_noising} if method == "smpo" else None
        curves[method] = train_and_track(method, base, out / "labelled", out, prompts, cfg, scorer, objective,
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
    data = {
        "config": asdict(cfg), "base": str(base), "held_out_prompts": len(prompts), "pairs": cfg.pairs,
        "labels": {k: labels[k] for k in ("pairs", "ties", "score_min", "score_max", "p_win_quantiles", "agreement")},
        "median_reward": medians, "mean_reward": means,
        "reward_vs_step": {METHOD_NAMES[m]: {"0": base_reward, **{str(s): r for s, r in c.items()}}
                           for m, c in curves.items()},
        "win_rates": rates.to_dict(orient="records"), "seconds": timings,
    }
    write_json(out / "report.json", data)
    text = "\n".join([
        "# smpo demo: the miniature world",
        "",
        f"Base: `{base}`. {cfg.pairs} pairs sampled from the base on train prompts and rated by "
        f"{cfg.raters} simulated raters; labelled by the world reward model "
        f"({labels['pairs']} pairs, {labels['ties']} human ties). Each method trained {cfg.train_steps} steps of "
        f"{cfg.batch_size} pairs at learning rate {cfg.learning_rate:g} (SmPO's x_t: {cfg.smpo_noising}). Evaluation: {len(prompts)} held-out "
        f"prompts, one image each, {cfg.sample_steps} DDIM steps, CFG {cfg.guidance_scale:g}, seed {cfg.seed}.",
        "",
        "World reward on the held-out prompts (win rate: share of prompts where the row's model's image "
        "scores higher, ties one half; 95% bootstrap interval over prompts):",
        "",
        table,
        "One seed is one draw: compare methods over several seeds (`--seed`) before concluding.",
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


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    run_demo(args.output, cfg, base=args.base, overwrite=args.overwrite, resume=args.resume)
    return 0


def load_report(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "report.json").read_text())
