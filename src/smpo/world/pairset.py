"""The world's preference dataset: pairs from several generators of graded quality, as Pick-a-Pic's.

Pick-a-Pic's images come from several text-to-image models, many stronger than the one being
tuned; a pair set sampled only from the base teaches the base nothing it can carry to new prompts
(docs/world.md). So each image of a pair here comes from one of several *generators*, recorded in
``model_0`` / ``model_1``:

| generator | image | typical world reward |
|---|---|---|
| ``render`` | the renderer's true image | 0.96 |
| ``render-blur`` | a render blurred (Gaussian, radius 1.2) | 0.7 |
| ``render-noise`` | a render with pixel noise (sigma 20) | 0.5 |
| ``render-wrong-colour`` | a render of the prompt with another object colour | 0.8 |
| ``render-wrong-position`` | a render of the prompt with the object elsewhere | 0.8 |
| ``world-base`` | the base model's sample (10 DDIM steps, CFG 3) | 0.45 |

Both generators of a pair are drawn independently (with ``GENERATOR_WEIGHTS``), so a pair can
hold two images of one generator, as in Pick-a-Pic. Prompts come from the ``pairs`` split (the
train prompts without the validation ones), several pairs per prompt. Simulated raters label each
pair (``smpo.world.raters``). ``make_pair_set`` is seeded end to end; the set shipped in
``smpo/world/pairs/`` was made by ``smpo world pairs --output src/smpo/world/pairs --seed 0``
(``pair_set_path()``), and the demo reads it as a real dataset would be downloaded.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image, ImageFilter
from tqdm.auto import tqdm

from smpo.io import write_json
from smpo.world.grammar import COLOURS, POSITIONS, parse_prompt, split
from smpo.world.raters import PAIRS_FILE, label_pairs, make_raters, write_parquet
from smpo.world.render import render

GENERATORS: tuple[str, ...] = ("render", "render-blur", "render-noise", "render-wrong-colour",
                               "render-wrong-position", "world-base")
GENERATOR_WEIGHTS: dict[str, float] = {"render": 0.5, "world-base": 0.5}
"""The shipped set's mix: how often each generator makes an image (independently for the two sides
of a pair). Chosen on validation prompts among three mixes (docs/world.md, "Calibration"); the
others are one ``--generators`` option away."""

BASE = "world-base"
SAMPLE_STEPS = 10
GUIDANCE_SCALE = 3.0


def pair_set_path() -> Path:
    """The shipped pair set (a folder with one Pick-a-Pic-schema parquet shard)."""
    return Path(__file__).parent / "pairs"


def defective_render(prompt: str, generator: str, rng: np.random.Generator) -> Image.Image:
    """A render of ``prompt`` as ``generator`` makes it (every generator but the base model)."""
    attributes = parse_prompt(prompt)
    if generator == "render-wrong-colour":
        others = [c for c in COLOURS if c != attributes.colour]
        attributes = replace(attributes, colour=others[rng.integers(len(others))])
    elif generator == "render-wrong-position":
        others = [p for p in POSITIONS if p != attributes.position]
        attributes = replace(attributes, position=others[rng.integers(len(others))])
    image = render(attributes, rng=rng)
    if generator == "render-blur":
        return image.filter(ImageFilter.GaussianBlur(1.2))
    if generator == "render-noise":
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 20.0, (*image.size[::-1], 3))
        return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    if generator not in ("render", "render-wrong-colour", "render-wrong-position"):
        raise ValueError(f"unknown generator {generator!r}; choose from {', '.join(GENERATORS)}")
    return image


class RenderPipeline:
    """A generator of ``GENERATORS`` other than the base, called as a diffusers pipeline is, so that
    ``smpo pairs --model render=python:smpo.world.pairset:RenderPipeline:render`` (or ``:render-blur``,
    ...) samples it: image ``i`` is ``defective_render(prompt, kind, rng)`` with ``rng`` seeded by
    the image's generator seed; sampling steps, guidance and size are ignored (32 px)."""

    def __init__(self, kind: str = "render"):
        if kind not in GENERATORS or kind == BASE:
            raise ValueError(f"unknown renderer {kind!r}; choose from {', '.join(g for g in GENERATORS if g != BASE)}")
        self.kind = kind

    def __call__(self, prompt: list[str], generator: list[torch.Generator], **ignored: object) -> SimpleNamespace:
        images = [defective_render(p, self.kind, np.random.default_rng(g.initial_seed()))
                  for p, g in zip(prompt, generator)]
        return SimpleNamespace(images=images)


def draw_pairs(count: int, seed: int, weights: dict[str, float] | None = None
               ) -> tuple[list[str], list[tuple[str, str]]]:
    """Each pair's prompt (the ``pairs`` split in seeded order, cycled: several pairs a prompt) and
    its two generators."""
    prompts = split("pairs")
    rng = np.random.default_rng([seed, 1])
    order = rng.permutation(len(prompts))
    weights = weights or GENERATOR_WEIGHTS
    names, w = list(weights), np.array(list(weights.values()))
    sides = rng.choice(len(names), size=(count, 2), p=w / w.sum())
    return ([prompts[order[i % len(prompts)]] for i in range(count)],
            [(names[a], names[b]) for a, b in sides])


def make_pair_set(base: str | Path, output_dir: str | Path, *, pairs: int = 2048, seed: int = 0, raters: int = 20,
                  batch_size: int = 64, weights: dict[str, float] | None = None, progress: bool = True) -> Path:
    """Draw, render or sample, rate and write ``output_dir/train-00000-of-00001.parquet`` (and
    ``pairset.json``, the recipe). Image ``k`` of pair ``i``: renders use a generator seeded with
    ``(seed, i, k)``, base samples the diffusion seed ``seed * 10**6 + 2 i + k``."""
    from smpo.world.model import load_world_pipeline

    weights = weights or GENERATOR_WEIGHTS
    unknown = sorted(set(weights) - set(GENERATORS))
    if unknown or not weights or min(weights.values()) <= 0:
        raise ValueError(f"generators {weights}: each must be one of {', '.join(GENERATORS)} with a positive weight")
    prompts, generators = draw_pairs(pairs, seed, weights)
    images: dict[tuple[int, int], Image.Image] = {}
    jobs = []
    for i, (prompt, sides) in enumerate(zip(prompts, generators)):
        for k, generator in enumerate(sides):
            if generator == BASE:
                jobs.append((i, k, prompt))
            else:
                images[i, k] = defective_render(prompt, generator, np.random.default_rng([seed, i, k]))
    pipe = load_world_pipeline(base)
    pipe.set_progress_bar_config(disable=True)
    for start in tqdm(range(0, len(jobs), batch_size), desc="sample base images", disable=not progress):
        chunk = jobs[start:start + batch_size]
        out = pipe([p for _, _, p in chunk], num_inference_steps=SAMPLE_STEPS, guidance_scale=GUIDANCE_SCALE,
                   generator=[torch.Generator().manual_seed(seed * 10**6 + 2 * i + k) for i, k, _ in chunk]).images
        for (i, k, _), image in zip(chunk, out):
            images[i, k] = image
    per_prompt = int(np.ceil(pairs / len(split("pairs"))))
    rows = label_pairs([(images[i, 0], images[i, 1]) for i in range(pairs)], prompts,
                       make_raters(raters, seed=seed), seed=seed, models=generators,
                       uids=[(f"{i:06d}-0", f"{i:06d}-1") for i in range(pairs)], examples_per_prompt=per_prompt)
    out_dir = Path(output_dir)
    write_parquet(rows, out_dir / PAIRS_FILE)
    write_json(out_dir / "pairset.json", {
        "pairs": pairs, "seed": seed, "raters": raters, "generator_weights": weights,
        "base_sample_steps": SAMPLE_STEPS, "base_guidance_scale": GUIDANCE_SCALE, "prompt_split": "pairs",
        "command": f"smpo world pairs --output {out_dir} --seed {seed} --pairs {pairs} --generators "
                   + ",".join(f"{k}={v:g}" for k, v in weights.items()),
    })
    return out_dir
