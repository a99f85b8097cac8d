"""Throughput of `smpo label` (pairs per second) on a synthetic Pick-a-Pic-schema set.

Builds ``--pairs`` pairs of random JPEGs of ``--image-size`` pixels in a temporary parquet file,
saves a tiny random PickScore-architecture scorer (or uses ``--scorer-path``), then times the
whole command (``smpo.cli.main(["label", ...])``: reading, JPEG decoding, scoring, writing the
shards and finalising) after one warm-up run on a few pairs. Example::

    OMP_NUM_THREADS=1 python benchmarks/bench_label.py --pairs 256 --image-size 512

With the tiny model the number measures the data path (decode, preprocessing, parquet), not a
real PickScore forward pass; pass ``--scorer-path`` to time a real checkpoint.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from smpo.cli import main


def random_jpeg(rng: np.random.Generator, size: int) -> bytes:
    # smooth random images compress like photos; white noise would make the JPEGs unrealistically large
    small = rng.integers(0, 256, size=(size // 16, size // 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_pairs(path: Path, pairs: int, size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    table = pa.table({
        "ranking_id": pa.array(range(pairs), pa.int64()),
        "caption": [f"a photo of thing number {i}" for i in range(pairs)],
        "jpg_0": pa.array([random_jpeg(rng, size) for _ in range(pairs)], pa.binary()),
        "jpg_1": pa.array([random_jpeg(rng, size) for _ in range(pairs)], pa.binary()),
        "label_0": pa.array([float(i % 2) for i in range(pairs)], pa.float64()),
    })
    pq.write_table(table, path)


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--scorer-path", default=None, help="a PickScore folder (default: a tiny random one)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_pairs(root / "pairs.parquet", args.pairs, args.image_size)
        scorer_path = args.scorer_path
        if scorer_path is None:
            from smpo.rewards.testing import save_tiny_scorer

            scorer_path = str(save_tiny_scorer("pickscore", root / "scorer"))
        common = ["--scorer-path", scorer_path, "--batch-size", str(args.batch_size), "--shard-size",
                  str(args.shard_size), "--device", args.device, "--no-progress"]
        main(["label", str(root / "pairs.parquet"), str(root / "warmup"), "--limit", str(args.batch_size), *common])
        start = time.perf_counter()
        main(["label", str(root / "pairs.parquet"), str(root / "out"), *common])
        seconds = time.perf_counter() - start

    result = {
        "pairs": args.pairs, "image_size": args.image_size, "batch_size": args.batch_size,
        "scorer": "tiny pickscore" if args.scorer_path is None else args.scorer_path, "device": args.device,
        "torch_threads": torch.get_num_threads(), "seconds": round(seconds, 2),
        "pairs_per_second": round(args.pairs / seconds, 1), "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main_bench()
