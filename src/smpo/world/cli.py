"""``smpo world``: pretrain the world's base model, list its prompts, score images."""

from __future__ import annotations

import argparse
import time

from smpo.io import prepare_output_dir, resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="world_command", required=True)
    pre = sub.add_parser("pretrain", help="train the world's base model on rendered images")
    pre.add_argument("--output", required=True, help="pipeline folder to write")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--steps", type=int, default=None, help="UNet + text encoder steps (default 3000)")
    pre.add_argument("--vae-steps", type=int, default=None, help="VAE steps (default 400)")
    pre.add_argument("--batch-size", type=int, default=None, help="images a step (default 32)")
    pre.add_argument("--pool-size", type=int, default=None, help="renders encoded for the UNet stage (default 4096)")
    pre.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")
    pre.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    pairs = sub.add_parser("pairs", help="make the world's preference pair set (several generators, simulated raters)")
    pairs.add_argument("--output", required=True, help="folder to write (one Pick-a-Pic-schema parquet shard)")
    pairs.add_argument("--seed", type=int, default=0)
    pairs.add_argument("--pairs", type=int, default=2048, help="number of pairs (default 2048)")
    pairs.add_argument("--base", default=None, help="world pipeline folder (default: the shipped base)")
    pairs.add_argument("--generators", default=None,
                       help="the mix, e.g. render=0.5,world-base=0.5 (default); generators: render, render-blur, "
                            "render-noise, render-wrong-colour, render-wrong-position, world-base")
    pairs.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    prompts = sub.add_parser("prompts", help="print the prompts of a split, one a line")
    prompts.add_argument("--split", choices=("train", "pairs", "validation", "held_out", "all"), default="train")


def _pretrain(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from smpo.world.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(seed=args.seed)
    for name in ("steps", "vae_steps", "batch_size", "pool_size"):
        if getattr(args, name) is not None:
            cfg = replace(cfg, **{name: getattr(args, name)})
    out = prepare_output_dir(args.output, overwrite=args.overwrite, resume=False)
    start = time.time()
    pretrain(out, cfg, device=resolve_device(args.device))
    print(f"wrote {out} in {time.time() - start:.0f} s")
    return 0


def _pairs(args: argparse.Namespace) -> int:
    from smpo.world.model import base_path
    from smpo.world.pairset import make_pair_set

    weights = None
    if args.generators:
        try:
            weights = {k.strip(): float(v) for k, v in (item.split("=") for item in args.generators.split(","))}
        except ValueError:
            raise ValueError(f"--generators {args.generators!r}: write name=weight pairs separated by commas") from None
    out = prepare_output_dir(args.output, overwrite=args.overwrite, resume=False)
    start = time.time()
    make_pair_set(args.base or base_path(), out, pairs=args.pairs, seed=args.seed, weights=weights)
    print(f"wrote {out} in {time.time() - start:.0f} s")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.world_command == "pretrain":
        return _pretrain(args)
    if args.world_command == "pairs":
        return _pairs(args)
    from smpo.world.grammar import split

    print("\n".join(split(args.split)))
    return 0
