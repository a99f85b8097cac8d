"""Throughput of `smpo pairs` (images per second, scoring included) against the bare pipeline call.

Saves an architecture preset of the SD1.5 family with random weights (``--preset tiny`` or
``sd15``; nothing is downloaded) and a tiny random PickScore (or uses ``--scorer-path``), loads the
pipeline once through smpo's loader, and times, after one warm-up batch:

- **bare**: the diffusers pipeline called on the same images (``prompt``, ``num_inference_steps``,
  ``guidance_scale``, one seeded CPU generator per image, ``output_type="pil"``) in batches of
  ``--batch-size``: the floor;
- **smpo pairs, sampling loop**: the product's per-shard function
  (``smpo.data.pair_images.sample_and_score``: the same pipeline calls, plus PNG encoding, decoding
  the stored bytes and scoring them), on the same images and batch size;
- **smpo pairs, whole command**: ``smpo.cli.main(["pairs", ...])`` end to end (loading the
  pipeline and the scorer, sampling, scoring, writing the shards, pairing, finalising).

Example::

    OMP_NUM_THREADS=2 python benchmarks/bench_pairs.py --preset tiny --prompts 16 --images-per-prompt 2 \\
        --batch-size 4 --steps 20

The target (issue 19) is the sampling loop within 1.1x of the bare call.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from smpo.cli import main
from smpo.data.generators import GeneratorSpec, MixedScorer
from smpo.data.pair_images import sample_and_score
from smpo.evaluation.generate import plan_images
from smpo.evaluation.pipelines import load_pipeline
from smpo.io import resolve_device, resolve_dtype
from smpo.models.presets import save_pipeline
from smpo.prompts import Prompt


def bare_calls(pipe, records, *, batch_size: int, steps: int, guidance_scale: float) -> None:
    for lo in range(0, len(records), batch_size):
        batch = records[lo : lo + batch_size]
        pipe(prompt=[r.prompt for r in batch], num_inference_steps=steps, guidance_scale=guidance_scale,
             generator=[torch.Generator().manual_seed(r.seed) for r in batch], output_type="pil")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "sd15"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--scorer-path", default=None, help="a PickScore folder (default: a tiny random one)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each; the median is reported")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype(None, device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = save_pipeline(root / "model", "sd15", args.preset)
        scorer_path = args.scorer_path
        if scorer_path is None:
            from smpo.rewards.testing import save_tiny_scorer

            scorer_path = str(save_tiny_scorer("pickscore", root / "scorer"))
        texts = [f"a photo of thing number {i}, in the style {i % 7}" for i in range(args.prompts)]
        prompts = [Prompt(t, i) for i, t in enumerate(texts)]
        (root / "prompts.txt").write_text("\n".join(texts) + "\n")
        records = plan_images(prompts, images_per_prompt=args.images_per_prompt, seed=0, seed_per_prompt=True)
        pipe, _ = load_pipeline(model, dtype=dtype, device=device)
        scorer = MixedScorer({"pickscore": 1.0}, {"pickscore": scorer_path}, device=device, dtype=dtype,
                             batch_size=16)
        spec = GeneratorSpec(name="bench", model=str(model), steps=args.steps, guidance_scale=args.guidance_scale)

        def loop() -> None:
            sample_and_score(pipe, spec, prompts, scorer, images_per_prompt=args.images_per_prompt, seed=0,
                             seed_per_prompt=True, batch_size=args.batch_size, image_format="png")

        def bare() -> None:
            bare_calls(pipe, records, batch_size=args.batch_size, steps=args.steps, guidance_scale=args.guidance_scale)

        bare_calls(pipe, records[: args.batch_size], batch_size=args.batch_size, steps=args.steps,
                   guidance_scale=args.guidance_scale)  # warm-up
        times: dict[str, list[float]] = {"bare": [], "loop": [], "command": []}
        for k in range(args.repeats):
            times["bare"].append(timed(bare))
            times["loop"].append(timed(loop))
            out = root / f"pairs-{k}"
            command = ["pairs", "--prompts", str(root / "prompts.txt"), "--model", f"bench={model}",
                       "--scorer-path", scorer_path, "--steps", str(args.steps), "--guidance-scale",
                       str(args.guidance_scale), "--images-per-prompt", str(args.images_per_prompt),
                       "--batch-size", str(args.batch_size), "--no-progress", "--output", str(out)]
            if args.device:
                command += ["--device", args.device]
            times["command"].append(timed(lambda command=command: main(command)))
    images = len(records)
    median = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
    result = {"preset": args.preset, "device": str(device), "dtype": str(dtype), "images": images,
              "batch_size": args.batch_size, "steps": args.steps, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "seconds": times,
              "images_per_second": {name: images / t for name, t in median.items()},
              "loop_over_bare": median["loop"] / median["bare"], "command_over_bare": median["command"] / median["bare"]}
    print(f"{images} images ({args.preset}, {args.steps} steps, batch {args.batch_size}, {device}, "
          f"{result['threads']} threads), median of {args.repeats}:")
    print("| run | seconds | images/s | x bare |\n|---|---|---|---|")
    for name, label in (("bare", "bare pipeline call"), ("loop", "smpo pairs sampling loop (scoring included)"),
                        ("command", "smpo pairs whole command")):
        print(f"| {label} | {median[name]:.2f} | {images / median[name]:.2f} | {median[name] / median['bare']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main_bench()
