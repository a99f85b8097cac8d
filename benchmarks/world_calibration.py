"""The calibration that chose the world's pair-set mix (docs/world.md, "Calibration"): Diffusion-DPO
trained on a pair set, its VALIDATION median-reward lift and win rate against the base every 20
steps. Validation prompts only; the held-out prompts are never looked at.

    smpo world pairs --output /tmp/mix --seed 0 --generators render=0.5,world-base=0.5
    python benchmarks/world_calibration.py --pairs /tmp/mix --learning-rate 3e-5 --seed 1000 --steps 80

Prints one line: the lift and win rate at each checkpoint (45 validation prompts x 3 images).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", required=True, help="a pair set folder (smpo world pairs output)")
    parser.add_argument("--work", default="/tmp/smpo-calibration", help="scratch folder")
    parser.add_argument("--method", default="dpo")
    parser.add_argument("--learning-rate", type=float, default=3e-5)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--images-per-prompt", type=int, default=3)
    args = parser.parse_args()

    import torch

    from smpo.evaluation.stats import win_rate
    from smpo.train.checkpoint import list_checkpoints
    from smpo.train.loop import train
    from smpo.world.grammar import split
    from smpo.world.model import base_path
    from smpo.world.reward import load_world_scorer
    from smpo.world.stages import DemoConfig, checkpoint_unet, label, score_images, train_config

    torch.set_num_threads(1)
    work = Path(args.work) / f"{Path(args.pairs).name}-{args.method}-lr{args.learning_rate:g}-s{args.seed}"
    labelled = Path(args.work) / f"{Path(args.pairs).name}-labelled"
    label(Path(args.pairs), labelled)
    base, scorer, prompts = base_path(), load_world_scorer(), split("validation")
    cfg = replace(DemoConfig(), train_steps=args.steps, batch_size=8, learning_rate=args.learning_rate,
                  seed=args.seed, eval_every=20)
    base_scores = score_images(base, None, prompts, work / "eval-base", cfg, scorer, "base",
                               images_per_prompt=args.images_per_prompt)
    started = time.time()
    train(train_config(args.method, base, labelled, work / "run", cfg))
    seconds = time.time() - started
    curve = {}
    for checkpoint in list_checkpoints(work / "run"):
        unet = checkpoint_unet(checkpoint, base, work / "unets" / checkpoint.name)
        scores = score_images(base, unet, prompts, work / "eval" / checkpoint.name, cfg, scorer, checkpoint.name,
                              images_per_prompt=args.images_per_prompt)
        curve[int(checkpoint.name.split("-")[-1])] = (round(float(np.median(scores) - np.median(base_scores)), 4),
                                                      round(win_rate(scores, base_scores), 3))
    print(f"{work.name}: training {seconds:.0f} s, base validation median {np.median(base_scores):.4f}; "
          f"(lift, win rate) by step: {curve}")


if __name__ == "__main__":
    main()
