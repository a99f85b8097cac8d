"""``smpo pairs``: make a preference set from prompts, generators and a reward model (no people).

For every prompt, K images from each generator (:mod:`smpo.data.generators`), each scored by the
scorer (one reward model or a weighted mix); the prompt's images are formed into pairs by a rule
(:mod:`smpo.data.pairing`) and written in the Pick-a-Pic schema with smoothed labels (Eq. 11), so
``smpo train`` reads the set directly and ``smpo label`` / ``smpo cache`` read it like any
Pick-a-Pic folder. Columns: ``pair_id``, ``caption``, ``jpg_0``, ``jpg_1`` (encoded image bytes),
``model_0``, ``model_1`` (generator names), ``label_0``, ``label_1`` (1 for the reward model's
winner, 0 for the other: there is no human label), ``image_0_uid``, ``image_1_uid``,
``best_image_uid``, ``seed_0``, ``seed_1``, ``prompt_index``, ``score_0``, ``score_1``, ``winner``,
``p_win`` (and ``score_0_<name>``, ``score_1_<name>`` per scorer of a mix).

The job runs like ``smpo label`` (:mod:`smpo.data.label`), so a kill at any moment followed by
the same command gives the same bytes as an uninterrupted run:

1. Images. The prompts are cut into shards of ``shard_size`` prompts; process ``i`` of ``world``
   (``smpo.processes.process_state``) takes shards ``i, i + world, ...``, and for each generator
   in turn (one pipeline in memory at a time) samples and scores every image of its shards not
   yet on disk, writing ``.work/gen-JJ/shard-KKKKK.parquet`` atomically
   (:mod:`smpo.data.pair_images`).
2. Finalisation (main process, once every image file is there). The pairs of each prompt are a
   pure function of its images' scores; the score range of Eq. 11 is taken over every image in a
   pair; each shard's pairs are written as ``train-KKKKK-of-NNNNN.parquet`` (atomically, a pure
   function of the work files), then ``pairs.json`` (the settings, the score range and the
   summary): its presence marks a finished set. ``.work`` is removed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from smpo.data.generators import (
    PYTHON_FAMILY,
    GeneratorSpec,
    MixedScorer,
    generator_family,
    parse_generators,
    parse_scorer,
    parse_scorer_paths,
    python_generator_factory,
)
from smpo.data.generators import resolved as resolved_spec
from smpo.data.pair_images import IMAGE_FORMATS, LATENT_SHAPE, sample_and_score, work_file, write_work_file
from smpo.data.pairing import PAIRING_RULES, PairingRule, form_pairs, winner_first
from smpo.io import (
    prepare_job_output,
    read_json,
    write_json,
)
from smpo.options import add_dataclass_arguments, dataclass_from_args, field_docs

PAIRS_FILE = "pairs.json"
IMAGE_SCORES_FILE = "image_scores.json"
WORK_DIR = ".work"
FORMAT = "smpo-pairs/1"
QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class PairsConfig:
    """Settings of `smpo pairs` (each field is one command-line option)."""

    prompts: str
    """Prompt set: parti, hpdv2, an HPDv2 benchmark folder, or a .txt/.json/.jsonl/.tsv/.csv file."""
    output: str
    """The new pair set folder (an unfinished run there with the same settings is resumed)."""
    model: list[str] | None = None
    """A generator, NAME=PATH (repeat for each; PATH alone is named by its last part): a diffusers pipeline folder or hub id (SD1.5, SDXL, SD3, FLUX), or python:MODULE:FACTORY[:ARG] (an object called like a pipeline, e.g. python:smpo.world.pairset:RenderPipeline:render)."""
    generator_options: list[str] | None = None
    """Settings of one generator, NAME:key=value,... (repeat per generator). Keys: unet (an `smpo train` final/ folder, full network or LoRA), lora_scale, steps, guidance_scale (or guidance, cfg), height, width, scheduler, negative_prompt."""
    generators: str | None = None
    """A YAML file listing generators: [{name: a, model: PATH, steps: 30, ...}, ...] (the same keys; adds to --model)."""
    scorer: str = "pickscore"
    """Reward model: pickscore, hpsv2.1, imagereward, aesthetic, clip, world; or a weighted mix of raw scores, e.g. pickscore=0.7,hpsv2.1=0.3 (score = sum of weight x score)."""
    scorer_path: list[str] | None = None
    """Weights of the scorer (folder/file/hub id); with a mix NAME=PATH, repeated."""
    images_per_prompt: int = 2
    """K: images per prompt from EACH generator."""
    steps: int = 50
    """Sampling steps of every generator without its own."""
    guidance_scale: float | None = None
    """CFG scale of every generator without its own (default: the family's)."""
    height: int | None = None
    """Image height of every generator without its own (default: the model's)."""
    width: int | None = None
    """Image width of every generator without its own (default: the model's)."""
    seed: int = 0
    """Base seed of the images (smpo generate's image_seed rule)."""
    seed_per_prompt: bool = True
    """Every prompt its own seeds, seed + 10000 x prompt index + image index (as smpo generate --seed-per-prompt); --no-seed-per-prompt: image i of every prompt uses seed + i."""
    pairing: PairingRule = "best-worst"
    """How a prompt's images become pairs: best-worst (best vs worst, 2nd best vs 2nd worst, ...), gap (every pair whose gap is >= --min-gap, largest first), random (seeded draws among those)."""
    min_gap: float = 0.0
    """Smallest score difference of a pair (equal scores never pair)."""
    pairs_per_prompt: int | None = 1
    """Most pairs per prompt (none: as many as the rule gives)."""
    across_generators: bool = False
    """Pair only images of two different generators."""
    score_min: float | None = None
    """Lower end of the score range of Eq. 11 (default: the lowest score of a paired image)."""
    score_max: float | None = None
    """Upper end of the score range of Eq. 11 (default: the highest score of a paired image)."""
    pair_id_prefix: str = ""
    """Put before every pair_id (`<prefix><prompt index>-<pair index>`), to keep the ids of several sets distinct."""
    keep_latents: bool = False
    """Also keep every paired image's sampled latent (latent_0, latent_1; float32) beside it, so `smpo train --stored-latents` trains on what the generator sampled instead of re-encoding the stored image through the VAE (only for a model with the generators' VAE)."""
    keep_image_scores: bool = False
    """Also keep every image's score, paired or not, in image_scores.json (generator, prompt_index, image_index, seed, score)."""
    categories: list[str] | None = None
    """Keep only these prompt categories."""
    limit: int | None = None
    """Keep only the first N prompts (after the category filter)."""
    batch_size: int = 4
    """Images per pipeline call."""
    score_batch_size: int = 16
    """Images per scorer forward pass."""
    shard_size: int = 100
    """Prompts per output shard (also the unit of resumption and of the split over processes)."""
    image_format: str = "png"
    """Stored image encoding: png (lossless), jpeg (quality 95) or webp (lossless)."""
    dtype: str | None = None
    """fp32, fp16 or bf16 (default fp16 on CUDA, fp32 elsewhere)."""
    device: str | None = None
    """Device (default: this process's accelerate device)."""
    overwrite: bool = False
    """Replace an existing output folder."""
    progress: bool = True
    """Show a progress bar (images per second)."""


_CHOICES = {"image_format": sorted(IMAGE_FORMATS)}
_REPEATED = ("model", "generator_options", "scorer_path")  # repeatable options: each use adds values


# ---------------------------------------------------------------------------------------------------
# The job.


def make_pairs(config: PairsConfig) -> dict[str, Any]:
    """Run `smpo pairs`; returns the summary (the same on every process of a launch)."""
    from smpo.evaluation.pipelines import FAMILY_GUIDANCE_SCALE
    from smpo.io import resolve_device, resolve_dtype
    from smpo.processes import process_state, wait_until
    from smpo.prompts import load_prompts

    started = time.perf_counter()
    weights = parse_scorer(config.scorer)
    scorer_paths = parse_scorer_paths(config.scorer_path or [], weights)
    specs = parse_generators(config.model or [], config.generator_options or [], yaml_file=config.generators)
    for name, value in (("images_per_prompt", config.images_per_prompt), ("batch_size", config.batch_size),
                        ("score_batch_size", config.score_batch_size), ("shard_size", config.shard_size)):
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if config.score_min is not None and config.score_max is not None and config.score_max <= config.score_min:
        raise ValueError(f"--score-max {config.score_max} must be above --score-min {config.score_min}")
    prompts = load_prompts(config.prompts, categories=config.categories, limit=config.limit)
    families = [generator_family(s, keep_latents=config.keep_latents) for s in specs]
    specs = [resolved_spec(s, steps=config.steps, guidance_scale=config.guidance_scale, height=config.height,
                           width=config.width) for s in specs]
    specs = [dataclasses.replace(s, guidance_scale=FAMILY_GUIDANCE_SCALE.get(f, 0.0)) if s.guidance_scale is None
             else s for s, f in zip(specs, families)]
    state = process_state()
    device = resolve_device(config.device) if config.device else state.device
    dtype = resolve_dtype(config.dtype, device)
    settings = _settings(config, specs, families, weights, scorer_paths, str(dtype).removeprefix("torch."))
    out = Path(config.output)
    if state.is_main_process:
        prepare_job_output(out, settings, job="smpo pairs", finished=PAIRS_FILE, kind="pair set",
                           work_dir=WORK_DIR,
                           overwrite=config.overwrite)
    state.wait_for_everyone()
    work, num_shards = out / WORK_DIR, math.ceil(len(prompts) / config.shard_size)
    mine = [k for k in range(num_shards) if k % state.num_processes == state.process_index]
    todo = [(j, k) for j in range(len(specs)) for k in mine if not work_file(work, j, k).exists()]
    if todo:
        from tqdm.auto import tqdm

        scorer = MixedScorer(weights, scorer_paths, device=device, dtype=dtype, batch_size=config.score_batch_size)
        total = sum(len(_shard_prompts(prompts, k, config.shard_size)) for _, k in todo) * config.images_per_prompt
        with tqdm(total=total, unit="img", desc="smpo pairs", disable=not (config.progress and
                                                                           state.is_local_main_process)) as bar:
            for j, spec in enumerate(specs):
                shards = [k for jj, k in todo if jj == j]
                if shards:
                    _make_images(spec, families[j], shards, work, j, prompts, scorer, config, device, dtype, bar.update)
    # No collective barrier: processes may finish hours apart (a resumed run); wait on disk instead.
    if not state.is_main_process:
        wait_until(lambda: (out / PAIRS_FILE).exists(), f"{out / PAIRS_FILE} (written by the main process)",
                   "smpo pairs")
        return read_json(out / PAIRS_FILE)["summary"]
    wait_until(lambda: (out / PAIRS_FILE).exists() or all(
        work_file(work, j, k).exists() for j in range(len(specs)) for k in range(num_shards)),
        "the other processes' images", "smpo pairs")
    return finalise(out, specs, num_shards, config, seconds=time.perf_counter() - started)


def _shard_prompts(prompts: list, k: int, shard_size: int) -> list:
    return prompts[k * shard_size : (k + 1) * shard_size]


def _make_images(spec: GeneratorSpec, family: str, shards: list[int], work: Path, j: int, prompts: list,
                 scorer: MixedScorer, config: PairsConfig, device: Any, dtype: Any,
                 on_images: Callable[[int], Any]) -> None:
    from smpo.evaluation.pipelines import load_pipeline
    from smpo.models.loading import FAMILIES

    if family == PYTHON_FAMILY:
        factory, args = python_generator_factory(spec.model)
        pipe = factory(*args)
    else:
        pipe, _ = load_pipeline(spec.model, family=family, unet=spec.unet, lora_scale=spec.lora_scale,
                                scheduler=spec.scheduler, dtype=dtype, device=device)
    latents_of = None
    if config.keep_latents:
        latents_of = functools.partial(_sampled_latents, FAMILIES[family], pipe)
    for k in shards:
        table = sample_and_score(pipe, spec, _shard_prompts(prompts, k, config.shard_size), scorer,
                                 images_per_prompt=config.images_per_prompt, seed=config.seed,
                                 seed_per_prompt=config.seed_per_prompt, batch_size=config.batch_size,
                                 image_format=config.image_format, on_images=on_images, latents_of=latents_of)
        write_work_file(work_file(work, j, k), table)
    del pipe
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


def _sampled_latents(adapter: Any, pipe: Any, latents: Any, height: int, width: int) -> Any:
    return adapter.sampled_latents(pipe, latents, height=height, width=width)


def _settings(config: PairsConfig, specs: list[GeneratorSpec], families: list[str], weights: dict[str, float],
              scorer_paths: dict[str, str], dtype: str) -> dict[str, Any]:
    """Everything that fixes the bytes of the set; a resumed run must repeat it."""
    keys = ("prompts", "images_per_prompt", "seed", "seed_per_prompt", "pairing", "min_gap", "pairs_per_prompt",
            "across_generators", "categories", "limit", "batch_size", "score_batch_size", "shard_size",
            "image_format", "score_min", "score_max")
    extra: dict[str, Any] = {"pair_id_prefix": config.pair_id_prefix} if config.pair_id_prefix else {}
    if config.keep_latents:  # absent from older runs, like the prefix
        extra["keep_latents"] = True
    return {**{k: getattr(config, k) for k in keys}, **extra, "dtype": dtype, "scorer": weights, "scorer_paths": scorer_paths,
            "generators": [{**asdict(s), "family": f} for s, f in zip(specs, families)]}


# ---------------------------------------------------------------------------------------------------
# Phase 2: pairs, labels, the finished set.


def shard_name(k: int, n: int) -> str:
    return f"train-{k:05d}-of-{n:05d}.parquet"


def _images(work: Path, specs: list[GeneratorSpec], k: int, *, columns: list[str] | None = None) -> pa.Table:
    """Every generator's images of shard ``k``, generator by generator, with a ``generator`` column."""
    tables = []
    for j in range(len(specs)):
        table = pq.read_table(work_file(work, j, k), columns=columns)
        tables.append(table.append_column("generator", pa.array([j] * table.num_rows, pa.int64())))
    return pa.concat_tables(tables)


def _prompt_pairs(images: pa.Table, config: PairsConfig) -> list[tuple[int, int, int]]:
    """``(prompt index, winner row, loser row)`` for every pair of the shard, prompt by prompt."""
    prompt_index = images.column("prompt_index").to_numpy()
    scores = images.column("score").to_numpy()
    groups = images.column("generator").to_numpy()
    pairs = []
    for p in sorted(set(prompt_index.tolist())):
        rows = np.flatnonzero(prompt_index == p)  # generator order, then image order
        chosen = form_pairs(scores[rows].tolist(), rule=config.pairing, min_gap=config.min_gap,
                            pairs_per_prompt=config.pairs_per_prompt, seed=config.seed, prompt_index=int(p),
                            groups=groups[rows].tolist() if config.across_generators else None)
        pairs.extend((int(p), int(rows[win]), int(rows[lose])) for win, lose in chosen)
    return pairs


def pair_table(images: pa.Table, pairs: list[tuple[int, int, int]], specs: list[GeneratorSpec],
               config: PairsConfig) -> pa.Table:
    """The shard's pairs in the Pick-a-Pic schema (without ``winner``/``p_win``)."""
    data = images.to_pydict()
    parts = [name[len("score_"):] for name in images.column_names if name.startswith("score_")]
    latents = ("latent", "latent_shape") if "latent" in images.column_names else ()
    names = [specs[g].name for g in data["generator"]]
    uid = [f"{names[r]}/{data['prompt_index'][r]:05d}_{data['image_index'][r]:02d}" for r in range(images.num_rows)]
    columns: dict[str, list] = {c: [] for c in (
        "pair_id", "caption", "jpg_0", "jpg_1", "model_0", "model_1", "label_0", "label_1", "image_0_uid",
        "image_1_uid", "best_image_uid", "seed_0", "seed_1", "prompt_index", "score_0", "score_1",
        *(f"score_{side}_{name}" for name in parts for side in (0, 1)),
        *(f"{c}_{side}" for c in latents for side in (0, 1)))}
    counts: dict[int, int] = {}
    for p, w, lo in pairs:
        r = counts[p] = counts.get(p, -1) + 1
        first, second = (w, lo) if winner_first(config.seed, p, r) else (lo, w)
        row = {"pair_id": f"{config.pair_id_prefix}{p}-{r}", "caption": data["caption"][w], "label_0": float(first == w),
               "label_1": float(second == w), "best_image_uid": uid[w], "prompt_index": p}
        for side, i in ((0, first), (1, second)):
            row.update({f"jpg_{side}": data["image"][i], f"model_{side}": names[i], f"image_{side}_uid": uid[i],
                        f"seed_{side}": data["seed"][i], f"score_{side}": data["score"][i]})
            row.update({f"score_{side}_{name}": data[f"score_{name}"][i] for name in parts})
            row.update({f"{c}_{side}": data[c][i] for c in latents})
        for key, value in row.items():
            columns[key].append(value)
    types = {"jpg_0": pa.binary(), "jpg_1": pa.binary(), "seed_0": pa.int64(), "seed_1": pa.int64(),
             "prompt_index": pa.int64(), "pair_id": pa.string(), "caption": pa.string(), "model_0": pa.string(),
             "model_1": pa.string(), "image_0_uid": pa.string(), "image_1_uid": pa.string(),
             "best_image_uid": pa.string(), "latent_0": pa.binary(), "latent_1": pa.binary(),
             "latent_shape_0": LATENT_SHAPE, "latent_shape_1": LATENT_SHAPE}
    schema = pa.schema([(c, types.get(c, pa.float64())) for c in columns])
    return pa.Table.from_pydict(columns, schema=schema)


def finalise(out: Path, specs: list[GeneratorSpec], num_shards: int, config: PairsConfig, *,
             seconds: float) -> dict[str, Any]:
    """Form the pairs, fix the score range, write the shards with ``winner``/``p_win``, then ``pairs.json``."""
    from smpo.data.label import with_labels
    from smpo.preference import score_range

    if (out / PAIRS_FILE).exists():
        return read_json(out / PAIRS_FILE)["summary"]
    work = out / WORK_DIR
    paired: list[np.ndarray] = []
    by_generator: dict[str, list[np.ndarray]] = {s.name: [] for s in specs}
    for k in range(num_shards):
        images = _images(work, specs, k, columns=["prompt_index", "image_index", "score"])
        scores = images.column("score").to_numpy()
        for j, spec in enumerate(specs):
            by_generator[spec.name].append(scores[images.column("generator").to_numpy() == j])
        rows = [i for _, w, lo in _prompt_pairs(images, config) for i in (w, lo)]
        paired.append(scores[rows])
    if sum(chunk.size for chunk in paired) == 0:
        raise ValueError(f"no pairs: no prompt has two images whose scores differ by at least --min-gap "
                         f"{config.min_gap} (rule {config.pairing})")
    score_min, score_max = score_range(paired)
    score_min = score_min if config.score_min is None else config.score_min
    score_max = score_max if config.score_max is None else config.score_max
    names = []
    for k in range(num_shards):
        images = _images(work, specs, k)
        table = with_labels(pair_table(images, _prompt_pairs(images, config), specs, config), score_min, score_max)
        names.append(shard_name(k, num_shards))
        write_work_file(out / names[-1], table)
    if config.keep_image_scores:
        columns = ["prompt_index", "image_index", "seed", "score"]
        tables = [_images(work, specs, k, columns=columns) for k in range(num_shards)]
        kept = pa.concat_tables(tables).to_pydict()
        kept["generator"] = [specs[j].name for j in kept["generator"]]
        write_json(out / IMAGE_SCORES_FILE, kept)
    summary = _summary(out, names, by_generator, score_min, score_max, seconds)
    write_json(out / PAIRS_FILE, {"format": FORMAT, "summary": summary, "score_min": score_min,
                                  "score_max": score_max, "shards": names,
                                  "columns": pq.read_schema(out / names[0]).names,
                                  "settings": read_json(work / "run.json")})
    shutil.rmtree(work)
    return summary


def _summary(out: Path, names: list[str], by_generator: dict[str, list[np.ndarray]], score_min: float,
             score_max: float, seconds: float) -> dict[str, Any]:
    table = pa.concat_tables(pq.read_table(out / n, columns=["model_0", "model_1", "winner", "p_win"]) for n in names)
    winner = table.column("winner").to_numpy()
    models = np.where(winner == 0, table.column("model_0").to_numpy(zero_copy_only=False),
                      table.column("model_1").to_numpy(zero_copy_only=False))
    generators = {}
    for name, chunks in by_generator.items():
        scores = np.concatenate(chunks)
        generators[name] = {"images": int(scores.size), "mean": float(scores.mean()),
                            "quantiles": {f"{q:g}": float(v) for q, v in zip(QUANTILES, np.quantile(scores, QUANTILES))},
                            "wins": int((models == name).sum())}
    images = sum(g["images"] for g in generators.values())
    return {"output": str(out), "images": images, "pairs": table.num_rows, "generators": generators,
            "score_min": score_min, "score_max": score_max, "seconds": seconds,
            "p_win_quantiles": {f"{q:g}": float(v) for q, v in zip(QUANTILES, np.quantile(table.column("p_win"),
                                                                                             QUANTILES))}}


def format_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines."""
    lines = [f"{summary['images']} images, {summary['pairs']} pairs -> {summary['output']} "
             f"({summary['seconds']:.1f} s this run)",
             f"  score range [{summary['score_min']:.6g}, {summary['score_max']:.6g}]; p_win quantiles "
             + ", ".join(f"q{k}={v:.4f}" for k, v in summary["p_win_quantiles"].items())]
    for name, g in summary["generators"].items():
        q = g["quantiles"]
        lines.append(f"  {name}: {g['images']} images, score mean {g['mean']:.6g}, min {q['0']:.6g}, "
                     f"median {q['0.5']:.6g}, max {q['1']:.6g}; winner of {g['wins']} pairs")
    return "\n".join(lines)


def read_pairs_metadata(folder: str | Path) -> dict[str, Any]:
    """The ``pairs.json`` of a finished pair set: settings, score range, summary, shards."""
    return read_json(Path(folder) / PAIRS_FILE)


# ---------------------------------------------------------------------------------------------------
# Command line.

EPILOG = """generators: --model NAME=PATH per generator, then --generator-options NAME:key=value,... for what
differs from the shared --steps/--guidance-scale/--height/--width, e.g.
  smpo pairs --prompts parti --model base=stable-diffusion-v1-5/stable-diffusion-v1-5 \\
    --model tuned=stable-diffusion-v1-5/stable-diffusion-v1-5 --generator-options tuned:unet=runs/smpo/final,lora_scale=0.8 \\
    --scorer pickscore --images-per-prompt 4 --output data/parti-pairs
or --generators FILE.yaml (a list of {name, model, unet, lora_scale, steps, guidance_scale, height, width,
scheduler, negative_prompt}). See docs/data.md."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    docs = field_docs(PairsConfig)
    for name in _REPEATED:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, action="extend", nargs="+",
                            metavar=name.upper(), default=argparse.SUPPRESS, help=docs[name].replace("%", "%%"))
    add_dataclass_arguments(parser, PairsConfig, aliases={"output": ("--out",), "guidance_scale": ("--cfg",)},
                            choices={**_CHOICES, "pairing": list(PAIRING_RULES)}, exclude=_REPEATED)


def run(args: argparse.Namespace) -> int:
    # A mistake in the input (bad generator or scorer spelling, a missing model, an existing output)
    # ends in one line and exit status 2 (smpo.cli.main).
    from smpo.processes import process_state

    # The repeated options are taken as typed: their values hold commas (NAME:steps=20,cfg=5).
    given = vars(args)
    repeated = {name: given.pop(name) for name in _REPEATED if name in given}
    config = dataclasses.replace(dataclass_from_args(PairsConfig, args, choices=_CHOICES), **repeated)
    summary = make_pairs(config)
    if process_state().is_main_process:
        print(format_summary(summary))
    return 0
