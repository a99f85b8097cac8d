"""Does training on the latents a model sampled, instead of its images re-encoded by the VAE, change
what its self-made pairs teach? (issues 19 and 20, in the miniature world)

One round from the world base, as the first online probe of issue 20: K images of every `pairs`
prompt by the base (10 DDIM steps, CFG 3), best against worst by the world reward, written by
``smpo pairs --keep-latents`` (one set: both variants train on the same pairs). Then each method
(SFT on the winners, Diffusion-DPO, SmPO; the demo's budget and the shipped study's rates) is
trained twice per seed, once from the stored images (encoded by the VAE, as every set without
latents is) and once from the stored latents (``smpo train --stored-latents``), and the held-out
median reward is measured at every checkpoint, against the base's on the same noise. Also
measured: the reward of the paired images after one VAE round trip (what re-encoding does to the
images training sees).

    python studies/world/sampled_latents.py --output latents-probe     # resumable; results.md at the end

Every job's result is written atomically under ``<output>/results``; a rerun does only what is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from smpo.io import atomic_path

RATES = {"sft": 3e-5, "dpo": 3e-5, "smpo": 1e-5}  # the shipped study's (src/smpo/world/study-summary.json)
VARIANTS = ("images", "latents")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--seeds", default="0,1,2", help="training and evaluation seeds, comma-separated")
    p.add_argument("--methods", default="sft,dpo,smpo")
    p.add_argument("--pair-prompts", type=int, default=None, help="first N of split('pairs') (default: all)")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-prompts", type=int, default=93, help="first N of split('held_out')")
    p.add_argument("--eval-images-per-prompt", type=int, default=2)
    p.add_argument("--sample-steps", type=int, default=10)
    return p.parse_args(argv)


def make_pair_set(out: Path, args: argparse.Namespace) -> Path:
    from smpo.data.make_pairs import PAIRS_FILE, PairsConfig, make_pairs
    from smpo.world.grammar import split
    from smpo.world.model import base_path

    pairs = out / "pairs"
    if not (pairs / PAIRS_FILE).is_file():
        prompts = out / "pair-prompts.txt"
        if not prompts.is_file():
            with atomic_path(prompts) as tmp:
                tmp.write_text("\n".join(split("pairs")[: args.pair_prompts]) + "\n")
        make_pairs(PairsConfig(prompts=str(prompts), output=str(pairs), model=[f"base={base_path()}"], scorer="world",
                               images_per_prompt=args.images_per_prompt, steps=args.sample_steps, guidance_scale=3.0,
                               pairing="best-worst", keep_latents=True, batch_size=32, shard_size=400,
                               keep_image_scores=True))
    return pairs


def vae_measures(pairs: Path, out: Path) -> dict[str, float]:
    """What the VAE does to the paired images, in one pass (``results/round-trip.json`` and
    ``results/latent-stats.json``): the world reward of the images as stored and after one
    encode-decode round trip; the stored (sampled) latents against the VAE's encoding of their
    images (standard deviation, mean, mean squared difference per value)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    from smpo.data.pair_images import latent_from_bytes
    from smpo.models import load_family, prepare_image
    from smpo.world.model import base_path
    from smpo.world.reward import load_world_scorer

    trip_path, stats_path = out / "results" / "round-trip.json", out / "results" / "latent-stats.json"
    if trip_path.is_file() and stats_path.is_file():
        return {**json.loads(trip_path.read_text()), **json.loads(stats_path.read_text())}
    columns = ["caption", "jpg_0", "jpg_1", "latent_0", "latent_1", "latent_shape_0", "latent_shape_1"]
    table = pa.concat_tables(pq.read_table(p, columns=columns) for p in sorted(pairs.glob("train-*.parquet"))).to_pylist()
    family, scorer, processor = load_family(str(base_path()), device="cpu"), load_world_scorer(), VaeImageProcessor()
    vae = family.vae
    stored, trip, sampled, encoded = [], [], [], []
    for lo in range(0, len(table), 64):
        rows = table[lo : lo + 64]
        images = [Image.open(io.BytesIO(r[f"jpg_{k}"])).convert("RGB") for r in rows for k in (0, 1)]
        captions = [r["caption"] for r in rows for _ in (0, 1)]
        pixels = torch.stack([prepare_image(image, family.resolution).pixels for image in images])
        with torch.no_grad():
            latents = family.encode_images(pixels)
            back = processor.postprocess(vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0],
                                         output_type="pil")
        stored.append(scorer(images, captions).numpy())
        trip.append(scorer(back, captions).numpy())
        encoded.append(latents)
        sampled += [latent_from_bytes(r[f"latent_{k}"], r[f"latent_shape_{k}"]) for r in rows for k in (0, 1)]
    s, t = np.concatenate(stored), np.concatenate(trip)
    x, e = torch.stack(sampled), torch.cat(encoded)
    trip_result = {"images": int(s.size), "stored_mean": float(s.mean()), "round_trip_mean": float(t.mean()),
                   "stored_median": float(np.median(s)), "round_trip_median": float(np.median(t))}
    stats = {"images": int(x.shape[0]), "sampled_std": float(x.std()), "encoded_std": float(e.std()),
             "sampled_mean": float(x.mean()), "encoded_mean": float(e.mean()),
             "mean_squared_difference": float((x - e).pow(2).mean())}
    _write(trip_path, trip_result)
    _write(stats_path, stats)
    return {**trip_result, **stats}


def run_job(method: str, variant: str, seed: int, pairs: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from smpo.train.checkpoint import list_checkpoints
    from smpo.train.loop import train
    from smpo.world.grammar import split
    from smpo.world.model import base_path
    from smpo.world.reward import load_world_scorer
    from smpo.world.stages import DemoConfig, checkpoint_unet, method_objective, score_images, train_config

    path = out / "results" / f"{method}-{variant}-seed{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    base, name = base_path(), f"{method}-{variant}-seed{seed}"
    cfg = DemoConfig(train_steps=args.train_steps, batch_size=args.batch_size, learning_rate=RATES[method],
                     eval_every=args.eval_every, sample_steps=args.sample_steps, seed=seed)
    run_dir = out / "runs" / name
    config = train_config(method, base, pairs, run_dir, cfg, method_objective(method, "renoise"), resume=True)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, stored_latents=variant == "latents"))
    if not (run_dir / "final").is_dir():
        train(config)
    prompts, scorer, curve = split("held_out")[: args.eval_prompts], load_world_scorer(), {}
    for checkpoint in list_checkpoints(run_dir):
        step = int(checkpoint.name.split("-")[-1])
        unet = checkpoint_unet(checkpoint, base, out / "unets" / name / checkpoint.name)
        rewards = score_images(base, unet, prompts, out / "eval" / name / checkpoint.name, cfg, scorer, name,
                               images_per_prompt=args.eval_images_per_prompt)
        curve[str(step)] = float(np.median(rewards))
    result = {"method": method, "variant": variant, "seed": seed, "learning_rate": RATES[method], "median": curve}
    _write(path, result)
    return result


def base_median(seed: int, out: Path, args: argparse.Namespace) -> float:
    from smpo.world.grammar import split
    from smpo.world.model import base_path
    from smpo.world.reward import load_world_scorer
    from smpo.world.stages import DemoConfig, score_images

    path = out / "results" / f"base-seed{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())["median"]
    cfg = DemoConfig(sample_steps=args.sample_steps, seed=seed)
    rewards = score_images(base_path(), None, split("held_out")[: args.eval_prompts], out / "eval" / f"base-seed{seed}",
                           cfg, load_world_scorer(), "base", images_per_prompt=args.eval_images_per_prompt)
    median = float(np.median(rewards))
    _write(path, {"seed": seed, "median": median})
    return median


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


def report(out: Path, pairs: Path, trip: dict[str, float], jobs: list[dict[str, Any]], bases: dict[int, float],
           argv: list[str]) -> str:
    from smpo.io import read_json

    summary = read_json(pairs / "pairs.json")["summary"]
    steps = sorted({int(s) for j in jobs for s in j["median"]})
    lines = ["# Sampled latents against re-encoded images (world, one round from the base)", "",
             f"Command: `python studies/world/sampled_latents.py {' '.join(argv)}`", "",
             f"Pairs: {summary['pairs']} (best against worst of {summary['images'] // summary['pairs']} base samples "
             f"per prompt); world reward of the paired images {trip['stored_mean']:.4f} as stored, "
             f"{trip['round_trip_mean']:.4f} after one VAE round trip (means over {trip['images']} images); "
             f"latents as sampled: std {trip['sampled_std']:.3f}, mean {trip['sampled_mean']:+.3f}; the VAE's encoding "
             f"of their images: std {trip['encoded_std']:.3f}, mean {trip['encoded_mean']:+.3f}; mean squared "
             f"difference {trip['mean_squared_difference']:.3f} per value.", "",
             "Held-out median reward lift over the base (same noise), mean over seeds "
             f"{', '.join(str(s) for s in sorted(bases))} (min / max in brackets):", "",
             "| method | trained on | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|---|" + "---|" * len(steps)]
    for method in dict.fromkeys(j["method"] for j in jobs):
        for variant in VARIANTS:
            chosen = [j for j in jobs if j["method"] == method and j["variant"] == variant]
            cells = []
            for s in steps:
                lifts = [j["median"][str(s)] - bases[j["seed"]] for j in chosen]
                cells.append(f"{np.mean(lifts):+.4f} ({min(lifts):+.4f} / {max(lifts):+.4f})")
            lines.append(f"| {method} | {'stored latents' if variant == 'latents' else 'images (VAE)'} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    pairs = make_pair_set(out, args)
    trip = vae_measures(pairs, out)
    bases = {s: base_median(s, out, args) for s in seeds}
    jobs = [run_job(m, v, s, pairs, out, args) for s in seeds for m in args.methods.split(",") for v in VARIANTS]
    text = report(out, pairs, trip, jobs, bases, argv)
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
