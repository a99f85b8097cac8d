"""``smpo study``: the paper's ablation ladder (Table 3) and the baselines, over seeds, in the world.

The protocol (docs/world.md):

1. One budget for every method (the demo's: pairs, steps, batch; ``StudyConfig``).
2. Tuning: each rung's learning rate, on the same grid for every rung, is chosen by the median
   world reward on the VALIDATION prompts (carved out of the train prompts), mean lift over the
   base across ``tune_seeds``. Nothing here looks at the held-out prompts.
3. Report: every rung at the paper's default settings (its objective defaults at ``paper_lr``)
   and at its tuned learning rate, over ``seeds`` training seeds never used for tuning, on the
   HELD-OUT prompts: median reward lift over the base and win rate against the base (same
   prompts and image seeds), mean over seeds with a 95% t-interval; the held-out reward at every
   checkpoint against training steps, UNet evaluations and seconds.

Every run (one rung, learning rate, seed and split) is a job whose result is written atomically
to ``results/<job>.json``; a rerun skips the jobs that have a result, and a killed training
continues from its last checkpoint, so a study resumes where it stopped. Jobs run in ``jobs``
separate processes of one thread each (faster than one process with two threads on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from smpo.io import atomic_path, prepare_output_dir, read_json, write_json


@dataclass(frozen=True)
class Rung:
    """One row of the study: a training method and its objective settings."""

    key: str
    label: str
    method: str
    objective: dict[str, Any] = field(default_factory=dict)
    start: str | None = None
    """``"sft"``: first fine-tune the base with SFT on the winners (the same budget, rate and seed),
    then train this rung from that UNet (policy and reference), as the paper's SD1.5 run starts
    from an SFT-tuned UNet. The lift is still measured against the base."""
    cached_inversion: bool = False
    """Train from the study's ``smpo cache --store-inversion`` of the pair set (the base inverts,
    once) with ``data.cached_inversion`` (the objective must invert with the reference)."""


RUNGS: tuple[Rung, ...] = (
    Rung("dpo", "Diffusion-DPO", "dpo"),
    Rung("inversion-t", "+ DDIM inversion (on t)", "smpo",
         {"labels": "binary", "noising": "ddim-inversion", "land_on_t": True}),
    Rung("inversion-grid", "+ DDIM inversion (authors' grid)", "smpo",
         {"labels": "binary", "noising": "ddim-inversion", "land_on_t": False}),
    Rung("renoise-t", "+ ReNoise (on t)", "smpo", {"labels": "binary", "noising": "renoise", "land_on_t": True}),
    Rung("renoise-grid", "+ ReNoise (authors' grid)", "smpo",
         {"labels": "binary", "noising": "renoise", "land_on_t": False}),
    Rung("smpo-t", "+ smoothed labels = SmPO (on t)", "smpo", {"land_on_t": True}),
    Rung("smpo-grid", "+ smoothed labels = SmPO (authors' grid)", "smpo", {"land_on_t": False}),
    Rung("smpo-forward", "SmPO, forward noising", "smpo", {"noising": "forward"}),
    # Probes (issue 10, item 5): the same authors' DDIM-InPO fresh noise; the paper's SFT start.
    Rung("smpo-inpo", "SmPO + InPO fresh noise 0.1 (authors' grid)", "smpo",
         {"land_on_t": False, "inversion_noise": 0.1}),
    Rung("smpo-after-sft", "SFT, then SmPO (authors' grid; twice the steps)", "smpo", {"land_on_t": False},
         start="sft"),
    # Controls of the SFT start: the same two stages with DPO, and SFT for both stages.
    Rung("dpo-after-sft", "SFT, then Diffusion-DPO (twice the steps)", "dpo", start="sft"),
    Rung("sft-after-sft", "SFT, then SFT again (twice the steps)", "sft", start="sft"),
    # Issue 11: the reference's inversion, stored once by `smpo cache` (equal to inverting with the
    # reference live, up to fp16), on the authors' grid: no inversion call is left in training.
    Rung("smpo-cached", "SmPO, reference inversion cached (authors' grid)", "smpo",
         {"land_on_t": False, "inverting_network": "reference"}, cached_inversion=True),
    Rung("kto", "Diffusion-KTO", "kto"),
    Rung("mapo", "MaPO", "mapo"),
    Rung("sft", "SFT (winners)", "sft"),
)
RUNG_BY_KEY = {r.key: r for r in RUNGS}


@dataclass(frozen=True)
class StudyConfig:
    """The study's settings; the budget defaults are the demo's (``smpo.world.demo.DemoConfig``)."""

    rungs: tuple[str, ...] = tuple(r.key for r in RUNGS)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # report seeds: training, pair order, t/noise and image seeds
    tune_seeds: tuple[int, ...] = (1000, 1001)  # tuning seeds, never reported
    lr_grid: tuple[float, ...] = (1e-5, 3e-5, 1e-4)  # the same for every rung
    paper_lr: float = 1e-5  # the paper's per-step rate: 1e-8 per pair x 1024 pairs a step
    train_steps: int = 40
    batch_size: int = 8
    eval_every: int = 20  # held-out checkpoints (report runs)
    images_per_prompt: int = 2  # held-out images per prompt (93 prompts)
    validation_images_per_prompt: int = 2  # validation images per prompt (45 prompts)
    sample_steps: int = 10
    guidance_scale: float = 3.0
    max_prompts: int | None = None  # use only the first N prompts of each split (quick runs)
    curve_rungs: tuple[str, ...] = ("dpo", "smpo-t", "smpo-grid", "smpo-forward")  # evaluated at every checkpoint


QUICK = StudyConfig(rungs=("dpo", "smpo-t", "sft"), seeds=(0, 1), tune_seeds=(1000,), lr_grid=(1e-5, 1e-4),
                    paper_lr=1e-5, train_steps=2, batch_size=2, eval_every=1, images_per_prompt=1,
                    validation_images_per_prompt=1, sample_steps=4, max_prompts=6,
                    curve_rungs=("dpo", "smpo-t", "sft"))


@dataclass(frozen=True)
class Job:
    """One training run (or the base, ``rung == "base"``) evaluated on one split."""

    rung: str
    lr: float
    seed: int
    split: str  # "validation" (tuning) or "held_out" (report)
    curve: bool = field(default=False, compare=False)  # evaluate every checkpoint, not only the last

    @property
    def name(self) -> str:
        if self.rung == "base":
            return f"base/seed{self.seed}-{self.split}"
        return f"{self.rung}/lr{self.lr:g}-seed{self.seed}-{self.split}"


SUMMARY_FILE = Path(__file__).parent / "study-summary.json"
"""The shipped result of the full study (``smpo study``; the command and its wall time inside):
the chosen learning rates and every row, without the per-image scores. ``smpo demo`` reads it."""


def shipped_summary() -> dict[str, Any] | None:
    return read_json(SUMMARY_FILE) if SUMMARY_FILE.is_file() else None


def demo_rung(method: str, smpo_noising: str = "renoise") -> str | None:
    """The study's rung of a demo method (``None`` for settings the study does not run)."""
    if method != "smpo":
        return method if method in RUNG_BY_KEY else None
    if smpo_noising == "forward":
        return "smpo-forward"
    if smpo_noising == "renoise":
        from smpo.objective import ObjectiveConfig

        return "smpo-t" if ObjectiveConfig().land_on_t else "smpo-grid"
    return None


def summary_of(data: dict[str, Any], command: str, seconds: float) -> dict[str, Any]:
    """What ships with the package from a finished study (no per-image scores)."""
    return {"command": command, "wall_seconds": round(seconds), "config": data["config"],
            "chosen": data["chosen"], "rows": data["rows"]}


# ---------------------------------------------------------------------------------------------
# One job


def _prompts(cfg: StudyConfig, split_name: str) -> list[str]:
    from smpo.world.grammar import split

    prompts = split(split_name)
    return prompts[: cfg.max_prompts] if cfg.max_prompts else prompts


def run_job(job: Job, cfg: StudyConfig, root: Path, base: Path, dataset: Path) -> dict[str, Any]:
    """Train (unless the base), evaluate, write ``results/<job>.json``; return the result.

    Images of prompt ``p``, image ``i`` use the same diffusion seed for every model of one seed
    (so win rates against the base are paired). Training and images are deleted afterwards; the
    result keeps every image's score.
    """
    import torch

    from smpo.train.checkpoint import list_checkpoints
    from smpo.train.loop import train
    from smpo.world.demo import DemoConfig, checkpoint_unet, score_images, train_config
    from smpo.world.reward import load_world_scorer

    result_path = root / "results" / f"{job.name}.json"
    if result_path.is_file():
        return read_json(result_path)
    torch.set_num_threads(1)
    work = root / "work" / job.name
    prompts = _prompts(cfg, job.split)
    per_prompt = cfg.images_per_prompt if job.split == "held_out" else cfg.validation_images_per_prompt
    scorer = load_world_scorer()
    demo_cfg = replace(DemoConfig(), train_steps=cfg.train_steps, batch_size=cfg.batch_size, learning_rate=job.lr,
                       sample_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale, seed=job.seed,
                       eval_every=cfg.eval_every if job.split == "held_out" else 0)

    def score(unet: Path | None, tag: str) -> list[float]:
        return score_images(base, unet, prompts, work / "eval" / tag, demo_cfg, scorer, tag,
                            images_per_prompt=per_prompt)

    result: dict[str, Any] = {"job": asdict(job), "prompts": len(prompts), "images_per_prompt": per_prompt}
    if job.rung == "base":
        result["scores"] = {"0": score(None, "base")}
    else:
        rung = RUNG_BY_KEY[job.rung]
        run_dir = work / "run"
        started = time.perf_counter()
        start_unet = None
        if rung.start == "sft":
            sft_dir = work / "start-sft"
            if not (sft_dir / "final").is_dir():
                train(train_config("sft", base, dataset, sft_dir, replace(demo_cfg, eval_every=0), resume=True))
            start_unet = sft_dir / "final" / "unet"
        config = train_config(rung.method, base, dataset, run_dir, demo_cfg, rung.objective, resume=True,
                              unet=start_unet)
        if rung.cached_inversion:
            config = replace(config, data=replace(config.data, dataset="", cache=str(inversion_cache_dir(root)),
                                                  cached_inversion=True))
        if not (run_dir / "final").is_dir():  # the export is written last, atomically
            train(config)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        result.update(
            train_seconds_this_call=time.perf_counter() - started,
            step_seconds=[r["seconds"] for r in records], unet_evals=[r["unet_evals"] for r in records],
            final_metrics={k: v for k, v in records[-1].items() if isinstance(v, float)},
            objective=asdict(config.objective.resolved()),
        )
        checkpoints = list_checkpoints(run_dir)
        if not job.curve:
            checkpoints = checkpoints[-1:]
        result["scores"] = {}
        for checkpoint in checkpoints:
            step = int(checkpoint.name.split("-")[-1])
            unet = checkpoint_unet(checkpoint, base, work / "unets" / checkpoint.name)
            result["scores"][str(step)] = score(unet, checkpoint.name)
    write_json(result_path, result)
    shutil.rmtree(work, ignore_errors=True)
    return result


def inversion_cache_dir(root: Path) -> Path:
    return root / "inversion-cache"


def build_inversion_cache(cfg: StudyConfig, root: Path, base: Path, dataset: Path, *, threads: int,
                          progress: Callable[[str], None]) -> None:
    """``smpo cache --store-inversion`` of the pair set with the base as the reference, for the
    rungs with ``cached_inversion`` (their objectives must agree on the inversion settings); nothing
    when no rung needs it or the cache is finished."""
    import torch

    from smpo.data.cache import InversionSpec, build_cache
    from smpo.models.family import load_family
    from smpo.objective import ObjectiveConfig

    specs = set()
    for key in cfg.rungs:
        rung = RUNG_BY_KEY[key]
        if rung.cached_inversion:
            o = ObjectiveConfig(method=rung.method, **rung.objective).resolved()
            specs.add(InversionSpec(unet=str(base), steps=o.inversion_steps, renoise_iters=o.effective_renoise_iters,
                                    land_on_t=o.land_on_t, guidance=o.inversion_guidance))
    if not specs or (inversion_cache_dir(root) / "manifest.parquet").is_file():
        return
    if len(specs) > 1:
        raise ValueError(f"the cached-inversion rungs disagree on the inversion settings: {specs}")
    progress("smpo study: caching the base's inversion of the pair set (smpo cache --store-inversion)")
    torch.set_num_threads(threads)
    family = load_family(base, with_unet=True)
    build_cache(dataset, inversion_cache_dir(root), family, model=str(base), shard_size=512, batch_size=64,
                inversion=specs.pop(), progress=False)


def _run_job_args(args: tuple[Job, StudyConfig, Path, Path, Path]) -> tuple[str, dict[str, Any]]:
    from smpo.cli import quiet_dependencies

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    quiet_dependencies()
    job = args[0]
    return job.name, run_job(*args)


def _finished(jobs: list[Job], root: Path) -> dict[str, dict[str, Any]]:
    return {j.name: read_json(root / "results" / f"{j.name}.json") for j in jobs
            if (root / "results" / f"{j.name}.json").is_file()}


def run_jobs(jobs: list[Job], cfg: StudyConfig, root: Path, base: Path, dataset: Path, *, workers: int,
             progress: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run the jobs that have no result yet (in ``workers`` processes); return every job's result."""
    done = _finished(jobs, root)
    todo = [j for j in jobs if j.name not in done]
    if todo:
        progress(f"{len(todo)} runs to do ({len(done)} already done)")
    started = time.time()
    args = [(j, cfg, root, base, dataset) for j in todo]
    if workers <= 1 or len(todo) <= 1:
        results = map(_run_job_args, args)
        pool = None
    else:
        import multiprocessing

        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(_run_job_args, args)
    try:
        for k, (name, result) in enumerate(results, 1):
            done[name] = result
            elapsed = time.time() - started
            progress(f"  [{k}/{len(todo)}] {name} ({elapsed:.0f} s elapsed, "
                     f"about {elapsed / k * (len(todo) - k):.0f} s left)")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return done


# ---------------------------------------------------------------------------------------------
# Analysis


def lift_and_win(scores: list[float], base_scores: list[float]) -> tuple[float, float]:
    """Median reward minus the base's, and the paired win rate against the base (ties one half)."""
    from smpo.evaluation.stats import win_rate

    return float(np.median(scores) - np.median(base_scores)), win_rate(scores, base_scores)


def choose_learning_rates(cfg: StudyConfig, results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per rung: the validation lift of every grid rate (mean over tuning seeds) and the chosen one
    (the highest mean lift; the smaller rate on an exact tie)."""
    chosen = {}
    for rung in cfg.rungs:
        table = {}
        for lr in cfg.lr_grid:
            lifts = []
            for seed in cfg.tune_seeds:
                run = results[Job(rung, lr, seed, "validation").name]
                base = results[Job("base", 0.0, seed, "validation").name]
                final = run["scores"][max(run["scores"], key=int)]
                lifts.append(lift_and_win(final, base["scores"]["0"])[0])
            table[f"{lr:g}"] = {"lifts": lifts, "mean": float(np.mean(lifts))}
        best = max(cfg.lr_grid, key=lambda lr: (table[f"{lr:g}"]["mean"], -lr))
        chosen[rung] = {"learning_rate": best, "validation": table}
    return chosen


def summarise(cfg: StudyConfig, results: dict[str, dict[str, Any]], chosen: dict[str, dict[str, Any]]
              ) -> list[dict[str, Any]]:
    """One row per (rung, setting): lift and win rate per seed, mean and 95% t-interval, the curve."""
    from smpo.evaluation.stats import t_interval

    rows = []
    for rung in cfg.rungs:
        settings = [("paper", cfg.paper_lr), ("tuned", chosen[rung]["learning_rate"])]
        for setting, lr in settings:
            lifts, wins, curves, evals, seconds, seeds = [], [], [], [], [], []
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
                evals.append(float(np.mean(run["unet_evals"])))
                seconds.append(float(np.median(run["step_seconds"])))
            if not seeds:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            rows.append({
                "rung": rung, "label": RUNG_BY_KEY[rung].label, "setting": setting, "learning_rate": lr,
                "seeds": seeds, "lift": lifts, "win_rate": wins,
                "lift_mean_ci": t_interval(lifts), "win_rate_mean_ci": t_interval(wins),
                "curve": {s: t_interval([c[s] for c in curves]) for s in steps},
                "unet_evals_per_step": float(np.mean(evals)), "seconds_per_step": float(np.median(seconds)),
            })
    return rows


def format_interval(triple: tuple[float, float, float] | list[float], digits: int = 3, sign: bool = True) -> str:
    """``mean [low, high]`` (the mean alone when there is no interval)."""
    m, lo, hi = triple
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    if math.isnan(lo):
        return f.format(m)
    return f"{f.format(m)} [{f.format(lo)}, {f.format(hi)}]"


def table_markdown(rows: list[dict[str, Any]], cfg: StudyConfig) -> str:
    lines = ["| rung | setting | learning rate | seeds | held-out median lift over base | win rate vs base | "
             "UNet evals / step | s / step (1 thread) |",
             "|---|---|---|---|---|---|---|---|"]
    tuned_rates = {r["rung"]: r["learning_rate"] for r in rows if r["setting"] == "tuned"}
    for r in rows:
        setting = r["setting"]
        if tuned_rates.get(r["rung"]) == r["learning_rate"]:  # the same runs: one row
            if setting == "paper":
                continue
            setting = "tuned = paper" if r["learning_rate"] == cfg.paper_lr else setting
        lines.append(f"| {r['label']} | {setting} | {r['learning_rate']:g} | {len(r['seeds'])} | "
                     f"{format_interval(r['lift_mean_ci'])} | "
                     f"{format_interval(r['win_rate_mean_ci'], 2, sign=False)} | {r['unet_evals_per_step']:.0f} | "
                     f"{r['seconds_per_step']:.2f} |")
    return "\n".join(lines) + "\n"


def tuning_markdown(cfg: StudyConfig, chosen: dict[str, dict[str, Any]]) -> str:
    head = "| rung | " + " | ".join(f"lr {lr:g}" for lr in cfg.lr_grid) + " | chosen |"
    lines = [head, "|---|" + "---|" * (len(cfg.lr_grid) + 1)]
    for rung, c in chosen.items():
        cells = [f"{c['validation'][f'{lr:g}']['mean']:+.4f}" for lr in cfg.lr_grid]
        lines.append(f"| {RUNG_BY_KEY[rung].label} | " + " | ".join(cells) + f" | {c['learning_rate']:g} |")
    return "\n".join(lines) + "\n"


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
    for r in rows:
        if r["setting"] != "tuned" or len(r["curve"]) < 2:
            continue
        steps = [0, *sorted(r["curve"])]
        lifts = [0.0, *(r["curve"][s][0] for s in sorted(r["curve"]))]
        axes[1].plot(steps, lifts, marker="o", label=r["label"])
        axes[2].plot([s * r["unet_evals_per_step"] for s in steps], lifts, marker="o", label=r["label"])
        axes[3].plot([s * r["seconds_per_step"] for s in steps], lifts, marker="o", label=r["label"])
    axes[1].set_xlabel("training step")
    axes[2].set_xlabel(f"UNet sample-evaluations in training (forward passes; {cfg.batch_size} pairs a step)")
    axes[3].set_xlabel("training seconds (one CPU thread, median step time)")
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


# ---------------------------------------------------------------------------------------------
# The study


def run_study(output: str | Path, cfg: StudyConfig = StudyConfig(), *, base: str | Path | None = None,
              dataset: str | Path | None = None, workers: int = 2, overwrite: bool = False,
              report_only: bool = False, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Tune, report, write ``study.json``, ``table.md``, ``study.png`` and ``report.md``; return the data.

    ``dataset``: a labelled pair set (``smpo label`` output); default: the shipped pair set,
    labelled into ``output/labelled`` first. ``report_only``: run nothing, report the held-out runs
    that have finished (the tuning must be complete); each row says how many seeds it holds.
    """
    from smpo.world.demo import label
    from smpo.world.model import base_path
    from smpo.world.pairset import pair_set_path

    root = prepare_output_dir(output, overwrite=overwrite, resume=True)
    settings = {**json.loads(json.dumps(asdict(cfg))), "base": str(base or base_path()),
                "dataset": str(dataset or pair_set_path())}
    settings_path = root / "study-settings.json"
    if settings_path.is_file():
        old = read_json(settings_path)
        changed = [k for k in settings if k not in ("rungs", "seeds", "curve_rungs") and old.get(k) != settings[k]]
        if changed:
            raise ValueError(f"{root} holds a study with other settings ({', '.join(changed)}); "
                             "use another --output or --overwrite")
    write_json(settings_path, settings)
    base = Path(base) if base else base_path()
    if dataset is None:
        label(pair_set_path(), root / "labelled")
        dataset = root / "labelled"
    dataset = Path(dataset)
    started = time.time()
    if not report_only:
        build_inversion_cache(cfg, root, base, dataset, threads=max(workers, 1), progress=progress)

    progress("smpo study: tuning learning rates on the validation prompts")
    tune = [Job("base", 0.0, s, "validation") for s in cfg.tune_seeds]
    tune += [Job(r, lr, s, "validation") for r in cfg.rungs for lr in cfg.lr_grid for s in cfg.tune_seeds]
    if report_only:
        results = _finished(tune, root)
        missing = [j.name for j in tune if j.name not in results]
        if missing:
            raise ValueError(f"{root}: the tuning is not finished ({len(missing)} runs missing, e.g. {missing[0]}); "
                             "run the study without --report-only")
    else:
        results = run_jobs(tune, cfg, root, base, dataset, workers=workers, progress=progress)
    chosen = choose_learning_rates(cfg, results)

    progress("smpo study: held-out runs (paper defaults and tuned rates)")
    report = [Job("base", 0.0, s, "held_out") for s in cfg.seeds]
    # Every rung at its tuned rate first (in ladder order, Diffusion-DPO first), then the paper's
    # rate where it differs: a study stopped early has the tuned rows complete.
    for r in cfg.rungs:
        report += [Job(r, chosen[r]["learning_rate"], s, "held_out", curve=r in cfg.curve_rungs) for s in cfg.seeds]
    for r in cfg.rungs:
        if cfg.paper_lr != chosen[r]["learning_rate"]:
            report += [Job(r, cfg.paper_lr, s, "held_out") for s in cfg.seeds]
    if report_only:
        results.update(_finished(report, root))
    else:
        results.update(run_jobs(report, cfg, root, base, dataset, workers=workers, progress=progress))
    rows = summarise(cfg, results, chosen)

    data = {"config": asdict(cfg), "base": str(base), "dataset": str(dataset), "chosen": chosen, "rows": rows,
            "seconds_this_call": round(time.time() - started, 1)}
    write_json(root / "study.json", data)
    table = table_markdown(rows, cfg)
    with atomic_path(root / "table.md") as tmp:
        tmp.write_text(table)
    plot_study(root / "study.png", rows, cfg)
    text = report_markdown(cfg, data, table)
    with atomic_path(root / "report.md") as tmp:
        tmp.write_text(text)
    progress(text)
    return data


def report_markdown(cfg: StudyConfig, data: dict[str, Any], table: str) -> str:
    held_out = len(_prompts(cfg, "held_out"))
    validation = len(_prompts(cfg, "validation"))
    return "\n".join([
        "# smpo study: the ablation ladder in the miniature world",
        "",
        f"Budget (every rung): {cfg.train_steps} steps of {cfg.batch_size} pairs, full fine-tuning, from the "
        f"shipped base, on the labelled pair set `{data['dataset']}`. Learning rates tuned on the grid "
        f"{', '.join(f'{lr:g}' for lr in cfg.lr_grid)} by the validation median lift ({validation} prompts x "
        f"{cfg.validation_images_per_prompt} images, seeds {', '.join(map(str, cfg.tune_seeds))}); 'paper' rows "
        f"use learning rate {cfg.paper_lr:g}. Reported on {held_out} held-out prompts x {cfg.images_per_prompt} "
        f"images, seeds {', '.join(map(str, cfg.seeds))} (mean over seeds [95% t-interval]); sampling "
        f"{cfg.sample_steps} DDIM steps, CFG {cfg.guidance_scale:g}.",
        "",
        table,
        "Validation lift per learning rate (mean over tuning seeds):",
        "",
        tuning_markdown(cfg, data["chosen"]),
        "Files: `study.json` (every value), `table.md`, `study.png`, `results/` (one file per run).",
        "",
    ])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="study-output", help="output folder (default: study-output); "
                        "an existing study there is resumed")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing --output first")
    parser.add_argument("--quick", action="store_true", help="a tiny study (3 rungs, 2 seeds) for tests")
    parser.add_argument("--rungs", default=None,
                        help=f"comma-separated rungs (default all: {', '.join(r.key for r in RUNGS)})")
    parser.add_argument("--seeds", type=int, default=None, help="report seeds 0..N-1 (default 5)")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes of one thread (default 2)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: report the runs that have finished (after the tuning)")
    parser.add_argument("--base", default=None, help="world pipeline folder (default: the shipped base)")
    parser.add_argument("--dataset", default=None,
                        help="labelled pair set (smpo label output; default: the shipped pair set, labelled)")


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    cfg = QUICK if args.quick else StudyConfig()
    if args.rungs:
        rungs = tuple(r.strip() for r in args.rungs.split(",") if r.strip())
        unknown = sorted(set(rungs) - set(RUNG_BY_KEY))
        if unknown:
            raise ValueError(f"--rungs: unknown {unknown}; choose from {', '.join(RUNG_BY_KEY)}")
        cfg = replace(cfg, rungs=rungs)
    if args.seeds is not None:
        if args.seeds < 2:
            raise ValueError("--seeds: at least 2 (an interval needs two seeds)")
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    return cfg


def run(args: argparse.Namespace) -> int:
    run_study(args.output, config_from_args(args), base=args.base, dataset=args.dataset, workers=args.workers,
              overwrite=args.overwrite, report_only=args.report_only)
    return 0
