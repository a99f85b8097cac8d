"""``smpo cache``: precompute the VAE latents and text conditioning of a preference dataset.

Training from a cache reads no image and runs no VAE or text encoder (the authors' script encodes
both images and the prompt at every step). For each pair the cache holds

- the latents of both images (``encode_images``: posterior mean times the VAE scaling factor) at
  the family's resolution, after resizing the shorter side and taking the centre crop,
- the prompt's conditioning (SD1.5: the CLIP text encoder's last hidden state; SDXL: both
  encoders' penultimate states and the pooled embedding), stored once per distinct caption of a
  shard, and each image's own image-dependent conditioning (SDXL's ``time_ids`` from its real
  original size and crop),
- the label columns training needs (``winner``, ``p_win``, ``label_0``, the scores, the caption),
- optionally (``--store-inversion``), each image's DDIM/ReNoise inversion by the frozen reference
  UNet at the inversion grid's levels (`InversionSpec`; ``smpo.inversion.invert_to_levels``),
  so that SmPO with ``inverting_network: reference`` only finishes the inversion at training time
  (``data.cached_inversion``; docs/training.md, "Cached reference inversion").

Layout of the output folder::

    cache.json                 what was cached and how (family, model, resolution, shard size, source)
    empty.safetensors          the empty prompt's conditioning (empty-prompt rate, inversion guidance)
    shards/shard-00000.safetensors   fp16 tensors; the pairs' ids and labels in its metadata
    manifest.parquet           one row per pair: pair_id, shard, index, label columns

Several processes (``accelerate launch`` / ``torchrun``): process ``i`` of ``n`` encodes shards
``i, i + n, ...``; each notes the end of its pass in ``.work/``, and the main process writes the
manifest once every process's pass is over (the bytes are those of one process). Shards are
written atomically (``smpo.io.atomic_path``), with the same bytes in every process: a killed job
resumes at the first missing shard (after removing the half-written one); the manifest is written
last. Read a cache with
:class:`smpo.data.latent_cache.LatentCache`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from smpo.data.latent_cache import CACHE_VERSION, LABEL_COLUMNS, STORAGE_DTYPE, InversionSpec, LatentCache
from smpo.io import (
    atomic_path,
    model_identity,
    prepare_output_dir,
    read_json,
    refuse_changed_settings,
    remove_temporaries,
    resolve_device,
    resolve_dtype,
    save_safetensors,
    write_json,
)
from smpo.models import FAMILY_NAMES, Conditioning, FamilyAdapter, crop_image, image_pixels
from smpo.options import add_dataclass_arguments, dataclass_from_args

WORK_DIR = ".work"  # each process's end-of-pass note while a launch runs

__all__ = ["CacheConfig", "CacheSummary", "InversionSpec", "build_cache", "bytes_per_pair", "encode_shard",
           "invert_images"]

# --------------------------------------------------------------------------------------------
# Writing


@dataclass
class CacheSummary:
    pairs: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    shards_written: int = 0
    shards_reused: int = 0


def bytes_per_pair(family: FamilyAdapter, inversion: InversionSpec | None = None) -> int:
    """Storage of one pair in fp16 (latents of two images, one prompt's conditioning, time ids; the
    stored inversion: ``inversion.steps`` more latents per image)."""
    empty = family.encode_prompts([""])
    latents = 2 * family.latent_channels * family.latent_size ** 2 * (1 + (inversion.steps if inversion else 0))
    text = empty.hidden_states[0].numel() + sum(v[0].numel() for v in (empty.added or {}).values())
    return 2 * (latents + text)


def _disk_estimate(rows: int, family: FamilyAdapter, inversion: InversionSpec | None = None) -> str:
    per_pair = bytes_per_pair(family, inversion)
    return (f"{rows:,} pairs x {per_pair / 2**10:.1f} KiB = {rows * per_pair / 2**30:.2f} GiB at most "
            "(less where captions repeat within a shard)")


def _encode_images(family: FamilyAdapter, images: list[Any], batch_size: int) -> tuple[Tensor, list, list]:
    squares, sizes, crops = zip(*(crop_image(im, family.resolution) for im in images))
    latents = [family.encode_images(image_pixels(squares[i:i + batch_size])) for i in range(0, len(squares), batch_size)]
    return torch.cat(latents).cpu(), list(sizes), list(crops)


def _encode_captions(family: FamilyAdapter, captions: list[str], batch_size: int) -> Conditioning:
    parts = [family.encode_prompts(captions[i:i + batch_size]) for i in range(0, len(captions), batch_size)]
    return Conditioning.cat(parts).to("cpu")


def _store(tensor: Tensor) -> Tensor:
    return tensor.to(STORAGE_DTYPE).contiguous() if tensor.is_floating_point() else tensor.contiguous()


def invert_images(family: FamilyAdapter, latents: Tensor, cond: Conditioning, spec: InversionSpec,
                  batch_size: int, network: Any = None) -> Tensor:
    """The reference's (``network``, default ``family.network``) inversion of ``latents`` at the grid
    levels, ``[N, L, C, h, w]`` on the CPU, as the objective's ``noise_latents`` would compute it
    with these settings."""
    uncond = None
    if spec.guidance != 1.0:
        uncond = cond.drop_text(torch.ones(len(cond), dtype=torch.bool), family.encode_prompts([""]))
    parts = []
    for i in range(0, latents.shape[0], batch_size):
        rows = slice(i, i + batch_size)
        x0 = latents[rows].to(family.device, torch.float32)
        with torch.no_grad():
            parts.append(family.invert_to_levels(
                family.network if network is None else network, x0, cond.index(rows),
                uncond=None if uncond is None else uncond.index(rows), guidance=spec.guidance,
                num_steps=spec.steps, renoise_iters=spec.renoise_iters, land_on_t=spec.land_on_t).cpu())
    return torch.cat(parts)


def encode_shard(family: FamilyAdapter, pairs: Sequence[Any], *, batch_size: int = 8,
                 inversion: InversionSpec | None = None) -> dict[str, Tensor]:
    """The tensors of one shard for ``pairs`` (``smpo.data.pairs.PreferencePair`` with decoded images)."""
    tensors: dict[str, Tensor] = {}
    for k in (0, 1):
        latents, sizes, crops = _encode_images(family, [getattr(p, f"image_{k}") for p in pairs], batch_size)
        tensors[f"image{k}.latents"] = _store(latents)
        if inversion is not None:  # from the stored (fp16) latents: what training reads
            captions = [p.caption for p in pairs]
            if inversion.size_conditioning == "target":
                cond = family.encode_prompts(captions)
            else:
                cond = family.encode_prompts(captions, original_sizes=sizes, crops_coords=crops)
            tensors[f"image{k}.inversion"] = _store(
                invert_images(family, tensors[f"image{k}.latents"].float(), cond, inversion, batch_size))
        tensors[f"image{k}.original_size"] = torch.tensor(sizes, dtype=torch.int32)
        tensors[f"image{k}.crop_top_left"] = torch.tensor(crops, dtype=torch.int32)
        if family.image_keys:
            dummy = Conditioning(torch.zeros(len(pairs), 1, 1), {})
            added = family.image_conditioning(dummy, original_sizes=sizes, crops_coords=crops).added or {}
            for key in family.image_keys:
                tensors[f"image{k}.added.{key}"] = added[key].float().cpu().contiguous()
    captions = list(dict.fromkeys(p.caption for p in pairs))
    text = _encode_captions(family, captions, batch_size)
    tensors["text.hidden_states"] = _store(text.hidden_states)
    for key, value in (text.added or {}).items():
        if key not in family.image_keys:
            tensors[f"text.added.{key}"] = _store(value)
    position = {c: i for i, c in enumerate(captions)}
    tensors["caption_index"] = torch.tensor([position[p.caption] for p in pairs], dtype=torch.int64)
    return tensors


def _shard_rows(pairs: Sequence[Any]) -> list[dict[str, Any]]:
    rows = []
    for p in pairs:
        row = {"pair_id": p.pair_id, "caption": p.caption, "label_0": p.label_0}
        row.update({col: p.extra[col] for col in LABEL_COLUMNS if col in p.extra})
        rows.append(row)
    return rows


def build_cache(data: str | os.PathLike, out: str | os.PathLike, family: FamilyAdapter, *, model: str = "",
                shard_size: int = 1000, batch_size: int = 8, overwrite: bool = False, split: str = "train",
                limit: int | None = None, progress: bool = True, inversion: InversionSpec | None = None
                ) -> CacheSummary:
    """Cache the latents and conditioning of every pair of ``data`` (any source ``smpo.data.pairs`` reads).

    ``inversion``: also store each image's inversion by ``family.network`` (the frozen reference).

    Human ties are kept (a labelled set's winner comes from the reward model). Pairs whose image
    cannot be decoded are skipped and listed in the summary. Resumes an unfinished ``out`` made
    with the same settings; ``overwrite`` starts again.
    """
    from tqdm.auto import tqdm

    from smpo.data.pairs import iter_shards, pairs_in_table
    from smpo.data.schema import ReadStats
    from smpo.data.sources import open_source
    from smpo.processes import process_state, wait_until

    state = process_state()
    source = open_source(data, split=split, limit=limit)
    info = {"version": CACHE_VERSION, "family": family.name, "model": model, "resolution": family.resolution,
            "prediction_type": family.prediction_type, "shard_size": shard_size, "source": str(data),
            "split": split, "limit": limit, "storage_dtype": "float16",
            "inversion": None if inversion is None else asdict(inversion)}
    if inversion is not None and family.network is None:
        raise ValueError("storing the inversion needs the reference UNet (load the family with its UNet)")
    if inversion is not None and not family.stores_inversion:
        raise ValueError(f"--store-inversion stores DDIM inversions (SD1.5, SDXL); the {family.name} family "
                         "inverts its flow at training time")
    folder, work = Path(out), Path(out) / WORK_DIR
    if state.is_main_process:
        prepare_output_dir(folder, overwrite=overwrite, resume=True)
        _check_resume(folder, info)
        write_json(folder / "cache.json", info)
        shutil.rmtree(work, ignore_errors=True)  # the passes of an earlier (killed) launch
        for place in (folder, folder / "shards"):  # and its half-written files
            remove_temporaries(place)
        work.mkdir()
        _announce(source, family, inversion)
        empty = family.encode_prompts([""]).to("cpu")
        save_safetensors(folder / "empty.safetensors", {
            "hidden_states": _store(empty.hidden_states),
            **{f"added.{k}": v.float().contiguous() for k, v in (empty.added or {}).items()}})
    state.wait_for_everyone()

    shard_dir = folder / "shards"
    shard_dir.mkdir(exist_ok=True)
    rank, world = state.process_index, state.num_processes
    done = {int(path.name[6:11]) for path in shard_dir.glob("shard-?????.safetensors")}
    summary = CacheSummary(shards_reused=len(done))
    def wanted(k: int) -> bool:
        return k % world == rank and k not in done

    n = source.num_rows
    todo = None if n is None else sum(min(shard_size, n - k * shard_size)
                                      for k in range(math.ceil(n / shard_size)) if wanted(k))
    bar = tqdm(total=todo, unit="pair", desc="smpo cache", disable=not (progress and state.is_local_main_process))
    for k, first_row, table in iter_shards(source, shard_size, wanted=wanted):
        stats = ReadStats()
        pairs = list(pairs_in_table(source, table, first_row, keep_ties=True, stats=stats))
        tensors = encode_shard(family, pairs, batch_size=batch_size, inversion=inversion) if pairs else {}
        meta = {"rows": json.dumps(_shard_rows(pairs)), "skipped": json.dumps(stats.to_dict()["skipped"])}
        save_safetensors(shard_dir / _shard_name(k), tensors or {"empty": torch.zeros(0)}, meta)
        summary.shards_written += 1
        bar.update(table.num_rows)
    bar.close()
    write_json(work / f"done-{rank:05d}.json", {"num_rows": source.num_rows})  # this process's pass is over
    # No collective barrier: processes may finish hours apart, longer than a process group's timeout.
    if not state.is_main_process:
        wait_until(lambda: (folder / "manifest.parquet").exists(), f"{folder / 'manifest.parquet'}", "smpo cache")
        summary.pairs = len(LatentCache(folder))
        return summary
    wait_until(lambda: all((work / f"done-{r:05d}.json").exists() for r in range(world)),
               "the other processes' shards", "smpo cache")
    num_rows = read_json(work / f"done-{0:05d}.json")["num_rows"]
    missing = [k for k in range(math.ceil(num_rows / shard_size)) if not (shard_dir / _shard_name(k)).exists()]
    if missing:
        raise ValueError(f"{folder}: shards {missing[:10]} are missing after every process's pass; rerun to resume")
    _write_manifest(folder, summary)
    shutil.rmtree(work)
    print(f"smpo cache: {summary.pairs} pairs in {folder} ({summary.shards_written} shards written here, "
          f"{summary.shards_reused} reused); skipped {len(summary.skipped)}", flush=True)
    for skipped in summary.skipped[:20]:
        print(f"  skipped pair {skipped['pair_id']} (row {skipped['row']}): {skipped['reason']}")
    return summary


def _announce(source: Any, family: FamilyAdapter, inversion: InversionSpec | None) -> None:
    if source.num_rows is not None:
        print(f"smpo cache: {source.description}: disk estimate {_disk_estimate(source.num_rows, family, inversion)}",
              flush=True)
    else:
        print(f"smpo cache: {source.description}: a stream of unknown length; disk estimate "
              f"{bytes_per_pair(family, inversion) / 2**10:.1f} KiB per pair", flush=True)


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _check_resume(folder: Path, info: dict[str, Any]) -> None:
    previous = folder / "cache.json"
    if previous.is_file():
        refuse_changed_settings(folder, read_json(previous), info, what="a cache")


def _write_manifest(folder: Path, summary: CacheSummary) -> None:
    """Gather every shard's rows into ``manifest.parquet`` (written last: a finished cache has one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors import safe_open

    rows: list[dict[str, Any]] = []
    for path in sorted((folder / "shards").glob("shard-*.safetensors")):
        with safe_open(str(path), framework="pt") as shard:
            meta = shard.metadata()
            index = shard.get_tensor("caption_index").tolist() if "caption_index" in shard.keys() else []
        for i, row in enumerate(json.loads(meta["rows"])):
            rows.append({**row, "shard": path.name, "index": i, "caption_index": index[i]})
        summary.skipped.extend(json.loads(meta["skipped"]))
    columns = ["pair_id", "shard", "index", "caption_index", "caption", *LABEL_COLUMNS]
    present = [c for c in columns if any(c in r for r in rows)] or columns[:5]
    table = pa.table({c: [r.get(c) for r in rows] for c in present})
    if len(set(table.column("pair_id").to_pylist())) != table.num_rows:
        raise ValueError(f"{folder}: the source has repeated pair_id values; the cache is keyed by pair_id")
    with atomic_path(folder / "manifest.parquet") as tmp:
        pq.write_table(table, tmp)
    summary.pairs = table.num_rows


# --------------------------------------------------------------------------------------------
# CLI


@dataclass
class CacheConfig:
    """Settings of `smpo cache` (each field is one command-line option; the inversion's in a group)."""

    data: str
    """labelled dataset (output of `smpo label`: a folder of parquet shards), or any source the pair reader takes"""
    model: str
    """diffusers pipeline folder or hub id (its VAE and text encoders)"""
    out: str
    """output folder"""
    family: str = "auto"
    """model family (auto: from model_index.json)"""
    vae: str | None = None
    """separate VAE folder or hub id (e.g. madebyollin/sdxl-vae-fp16-fix)"""
    revision: str | None = None
    """hub revision of --model"""
    variant: str | None = None
    """weights variant of --model (e.g. fp16)"""
    split: str = "train"
    """split of the source"""
    limit: int | None = None
    """cache only the first N rows"""
    resolution: int | None = None
    """pixel size of the square crop (default: the model's, e.g. 512 SD1.5, 1024 SDXL)"""
    shard_size: int = 1000
    """pairs per shard file"""
    batch_size: int = 8
    """images per VAE / text-encoder call"""
    device: str | None = None
    """cuda, cpu, ... (default: the best available)"""
    dtype: str | None = None
    """fp32, fp16 or bf16 for encoding (default: fp16 on CUDA, else fp32)"""
    overwrite: bool = False
    """replace an existing output folder"""
    progress: bool = True
    """show a progress bar"""
    store_inversion: bool = False
    """also store each image's inversion by the frozen reference UNet at the grid levels (fp16)"""
    unet: str | None = None
    """the reference UNet, when not the pipeline's (e.g. an SFT-tuned one)"""
    inversion_steps: int = 5
    """inversion grid size (SDXL recipes: 10)"""
    renoise_iters: int = 1
    """ReNoise iterations per step (0: DDIM)"""
    land_on_t: bool = False
    """the objective's land_on_t (false: the authors' grid)"""
    inversion_guidance: float = 1.0
    """CFG weight of the inversion"""
    size_conditioning: Literal["image", "target"] = "image"
    """SDXL time ids the inversion conditions on: the training's data.size_conditioning"""


_CHOICES = {"family": ("auto", *FAMILY_NAMES)}
_INVERSION_OPTIONS = ("store_inversion", "unet", "inversion_steps", "renoise_iters", "land_on_t",
                      "inversion_guidance", "size_conditioning")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    main_options = [f.name for f in fields(CacheConfig) if f.name not in _INVERSION_OPTIONS]
    add_dataclass_arguments(parser, CacheConfig, positional=("data",), aliases={"out": ("--output",)},
                            choices=_CHOICES, exclude=_INVERSION_OPTIONS)
    inv = parser.add_argument_group("stored reference inversion (for SmPO with inverting_network: reference)")
    add_dataclass_arguments(inv, CacheConfig, exclude=main_options)


def run(args: argparse.Namespace) -> int:
    from smpo.models import load_family

    config = dataclass_from_args(CacheConfig, args, choices=_CHOICES)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    inversion = None
    if config.store_inversion:
        if config.inversion_steps < 1 or config.renoise_iters < 0:
            raise ValueError(f"--inversion-steps must be >= 1 and --renoise-iters >= 0; got {config.inversion_steps} "
                             f"and {config.renoise_iters}")
        inversion = InversionSpec(unet=model_identity(config.unet or config.model), steps=config.inversion_steps,
                                  renoise_iters=config.renoise_iters, land_on_t=config.land_on_t,
                                  guidance=config.inversion_guidance, size_conditioning=config.size_conditioning)
    elif config.unet:
        raise ValueError("--unet is the reference of --store-inversion; the latents need only --model")
    family = load_family(config.model, family=config.family, vae=config.vae, network=config.unet, revision=config.revision,
                         variant=config.variant, dtype=dtype, device=device, with_network=inversion is not None)
    if config.resolution is not None:
        family.resolution = config.resolution
    build_cache(config.data, config.out, family, model=str(config.model), shard_size=config.shard_size,
                batch_size=config.batch_size, overwrite=config.overwrite, split=config.split, limit=config.limit,
                progress=config.progress, inversion=inversion)
    return 0

