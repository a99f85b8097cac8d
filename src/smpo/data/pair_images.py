"""Phase 1 of ``smpo pairs`` (:mod:`smpo.data.make_pairs` tells the whole protocol): sample and
score the images of one generator for one shard of prompts, and write them as one parquet file,
``.work/gen-JJ/shard-KKKKK.parquet``, atomically (there whole or not at all).

Sampling is `smpo generate`'s (:func:`smpo.evaluation.generate.plan_images` picks every image's
seed with the same ``image_seed`` rule, and its per-batch sampler draws it), so
``smpo generate --seed-per-prompt ...`` with the generator's settings remakes the images. Each image
is encoded once (PNG by default, lossless) and the scorer scores the DECODED stored bytes, so a
stored score is an independent score of the stored image.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from smpo.data.generators import GeneratorSpec
from smpo.data.schema import ROW_GROUP_PAIRS
from smpo.evaluation.generate import plan_images, sample_batch
from smpo.io import atomic_path
from smpo.prompts import Prompt

IMAGE_FORMATS = {"png": ("PNG", {}), "jpeg": ("JPEG", {"quality": 95}), "webp": ("WEBP", {"lossless": True})}

IMAGE_SCHEMA = pa.schema([
    ("prompt_index", pa.int64()), ("image_index", pa.int64()), ("caption", pa.string()), ("seed", pa.int64()),
    ("image", pa.binary()), ("score", pa.float64()),
])


def work_file(work: Path, generator: int, shard: int) -> Path:
    return work / f"gen-{generator:02d}" / f"shard-{shard:05d}.parquet"


def encode_image(image: Image.Image, image_format: str) -> bytes:
    """The stored bytes of one image."""
    name, options = IMAGE_FORMATS[image_format]
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=name, **options)
    return buffer.getvalue()


def decode_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def image_table_schema(parts: Sequence[str], *, latents: bool = False) -> pa.Schema:
    """The work file's columns: :data:`IMAGE_SCHEMA`, plus ``score_<name>`` per scorer of a mix,
    plus ``latent`` and ``latent_shape`` with ``latents`` (:func:`latent_bytes`)."""
    schema = IMAGE_SCHEMA
    for name in parts:
        schema = schema.append(pa.field(f"score_{name}", pa.float64()))
    if latents:
        schema = schema.append(pa.field("latent", pa.binary())).append(pa.field("latent_shape", LATENT_SHAPE))
    return schema


LATENT_SHAPE = pa.list_(pa.int64())


def latent_bytes(latent: torch.Tensor) -> bytes:
    """One image's sampled latent ``[C, h, w]`` as stored: float32, little-endian, C order."""
    return latent.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()


def latent_from_bytes(data: bytes, shape: Sequence[int]) -> torch.Tensor:
    """The inverse of :func:`latent_bytes`."""
    return torch.from_numpy(np.frombuffer(data, dtype="<f4").reshape(tuple(shape)).copy())


def sample_and_score(pipe: Any, spec: GeneratorSpec, prompts: Sequence[Prompt], score_fn: Any, *,
                     images_per_prompt: int, seed: int, seed_per_prompt: bool, batch_size: int, image_format: str,
                     on_images: Callable[[int], Any] = lambda n: None,
                     latents_of: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None) -> pa.Table:
    """The images of ``prompts`` by one generator (``spec``, fully resolved), scored, as one table.

    ``score_fn`` is a :class:`smpo.data.generators.MixedScorer`; with more than one scorer each
    one's scores are kept as ``score_<name>``. With ``latents_of`` (the family's
    ``sampled_latents``, given the pipeline's last latents and the image height and width), every
    image's sampled latent is kept too.
    """
    plan = plan_images(prompts, images_per_prompt=images_per_prompt, seed=seed, seed_per_prompt=seed_per_prompt)
    parts = list(score_fn.weights) if len(score_fn.weights) > 1 else []
    schema = image_table_schema(parts, latents=latents_of is not None)
    columns: dict[str, list] = {name: [] for name in schema.names}
    for lo in range(0, len(plan), batch_size):
        batch = plan[lo : lo + batch_size]
        caught: list[torch.Tensor] = []
        images = sample_batch(pipe, batch, guidance_scale=spec.guidance_scale, num_inference_steps=spec.steps,
                              height=spec.height, width=spec.width, negative_prompt=spec.negative_prompt,
                              control_image=None, conditioning_scale=None,
                              on_latents=None if latents_of is None else caught.append)
        if latents_of is not None:
            width, height = images[0].size
            for latent in latents_of(caught[0], height, width):
                columns["latent"].append(latent_bytes(latent))
                columns["latent_shape"].append(list(latent.shape))
        stored = [encode_image(image, image_format) for image in images]
        scores = score_fn([decode_image(data) for data in stored], [r.prompt for r in batch])
        for record, data, score in zip(batch, stored, scores.tolist()):
            columns["prompt_index"].append(record.prompt_index)
            columns["image_index"].append(record.image_index)
            columns["caption"].append(record.prompt)
            columns["seed"].append(record.seed)
            columns["image"].append(data)
            columns["score"].append(float(score))
        for name in parts:
            columns[f"score_{name}"].extend(float(s) for s in score_fn.last_parts[name].tolist())
        on_images(len(batch))
    return pa.Table.from_pydict(columns, schema=schema)


def write_work_file(path: Path, table: pa.Table) -> None:
    """One generator's images of one shard, atomically."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_PAIRS)
