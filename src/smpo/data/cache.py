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

Shards are written atomically (``smpo.io.atomic_path``): a killed job resumes at the first
missing shard; the manifest is written last. Read a cache with :class:`LatentCache`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from smpo.io import (
    atomic_path,
    model_identity,
    prepare_output_dir,
    read_json,
    resolve_device,
    resolve_dtype,
    write_json,
)
from smpo.models.family import Conditioning, FamilyAdapter, prepare_image
from smpo.objective import PairBatch

CACHE_VERSION = 1


@dataclass(frozen=True)
class InversionSpec:
    """What a stored inversion was computed with; training checks its objective against it."""

    unet: str  # the reference UNet: --unet, else the pipeline's (--model)
    steps: int = 5
    renoise_iters: int = 1  # 0: plain DDIM inversion
    land_on_t: bool = False
    guidance: float = 1.0
    size_conditioning: str = "image"  # SDXL time ids: each image's own, or the authors' fixed target

    def mismatches(self, objective: Any, size_conditioning: str, unet: str) -> list[str]:
        """The settings of a run (resolved objective, ``data.size_conditioning``, its initial UNet)
        that differ from this spec, as ``name: run vs cache`` strings."""
        pairs = {"objective.inversion_steps": (objective.inversion_steps, self.steps),
                 "objective.renoise_iters (effective)": (objective.effective_renoise_iters, self.renoise_iters),
                 "objective.land_on_t": (objective.land_on_t, self.land_on_t),
                 "objective.inversion_guidance": (objective.inversion_guidance, self.guidance),
                 "data.size_conditioning": (size_conditioning, self.size_conditioning),
                 "reference UNet (model.unet or model.pretrained)": (model_identity(unet), model_identity(self.unet))}
        return [f"{k}: {run!r} vs {cached!r}" for k, (run, cached) in pairs.items() if run != cached]
STORAGE_DTYPE = torch.float16
LABEL_COLUMNS = ("winner", "p_win", "label_0", "score_0", "score_1")
"""Columns copied into the manifest when the source has them (``smpo label`` writes all five)."""


# --------------------------------------------------------------------------------------------
# Reading


@dataclass
class CachedPair:
    """One cached pair; tensors as stored (fp16), without a batch dimension.

    ``latents[k]``: image ``k``'s latents ``[C, h, w]``; ``conditioning(k)`` rebuilds image ``k``'s
    full :class:`Conditioning` (a batch of 1). ``labels`` holds the manifest's label columns.
    """

    pair_id: str
    caption: str
    latents: tuple[Tensor, Tensor]
    hidden_states: Tensor
    text_added: dict[str, Tensor]
    image_added: tuple[dict[str, Tensor], dict[str, Tensor]]
    labels: dict[str, Any] = field(default_factory=dict)
    inversion: tuple[Tensor, Tensor] | None = None  # each image's stored inversion, [L, C, h, w]

    def conditioning(self, image: int) -> Conditioning:
        """The conditioning of image ``image`` (0 or 1) with its prompt, a batch of 1."""
        added = {**self.text_added, **self.image_added[image]}
        return Conditioning(self.hidden_states[None], {k: v[None] for k, v in added.items()} or None)

    @property
    def human_winner(self) -> int | None:
        """The image the human preferred (``label_0``: 1 -> 0, 0 -> 1); ``None`` for a tie or no label."""
        label = self.labels.get("label_0")
        if label is None or float(label) == 0.5:
            return None
        return 0 if float(label) == 1.0 else 1

    @property
    def winner(self) -> int:
        """The reward-chosen winner (``smpo label``'s ``winner`` column), else the human label's."""
        if self.labels.get("winner") is not None:
            return int(self.labels["winner"])
        if self.human_winner is None:
            raise ValueError(f"pair {self.pair_id}: no winner column and no human preference "
                             f"(label_0={self.labels.get('label_0')})")
        return self.human_winner

    @property
    def p_win(self) -> float:
        """The smoothed probability of :attr:`winner` (Eq. 11); 1.0 when the cache has no ``p_win``."""
        value = self.labels.get("p_win")
        return 1.0 if value is None else float(value)


def pair_batch(pairs: Sequence[CachedPair], seeds: Sequence[int], *, human_labels: bool = False,
               uncond: Conditioning | None = None, device: torch.device | str | None = None) -> PairBatch:
    """A :class:`smpo.objective.PairBatch` of cached pairs, winner first.

    The winner is the reward-chosen one (``winner`` column) with its ``p_win``, or with
    ``human_labels`` the human's choice with ``p_win = 1`` (ties must have been dropped). Latents
    are returned in float32; each image keeps its own conditioning (SDXL ``time_ids``).
    """
    order = []
    for pair in pairs:
        w = pair.human_winner if human_labels else pair.winner
        if w is None:
            raise ValueError(f"pair {pair.pair_id} is a human tie; drop ties before batching with human labels")
        order.append(w)
    latents_w = torch.stack([p.latents[w] for p, w in zip(pairs, order)]).float()
    latents_l = torch.stack([p.latents[1 - w] for p, w in zip(pairs, order)]).float()
    cond = Conditioning.cat([p.conditioning(w) for p, w in zip(pairs, order)])
    cond_l = Conditioning.cat([p.conditioning(1 - w) for p, w in zip(pairs, order)])
    p_win = torch.tensor([1.0 if human_labels else p.p_win for p in pairs])
    batch = PairBatch(latents_w=latents_w, latents_l=latents_l, cond=cond, p_win=p_win, seeds=list(seeds),
                      uncond=uncond, cond_l=cond_l)
    return batch if device is None else batch.to(device)


class LatentCache:
    """Read a folder written by ``smpo cache``: ``len``, ``pair_ids``, ``get(pair_id)``, ``cache[i]``.

    Shards are memory-mapped (safetensors) and opened on first use.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        info_path, manifest_path = self.folder / "cache.json", self.folder / "manifest.parquet"
        if not info_path.is_file() or not manifest_path.is_file():
            raise FileNotFoundError(f"{self.folder} is not a finished smpo cache (cache.json or manifest.parquet "
                                    "is missing; rerun `smpo cache` to finish it)")
        self.info: dict[str, Any] = read_json(info_path)
        import pyarrow.parquet as pq

        self.manifest = pq.read_table(manifest_path).to_pydict()
        self._ids: list[str] = [str(p) for p in self.manifest["pair_id"]]
        self._row_of = {pid: i for i, pid in enumerate(self._ids)}
        self._shards: dict[str, Any] = {}

    @property
    def family(self) -> str:
        return str(self.info["family"])

    @property
    def resolution(self) -> int:
        return int(self.info["resolution"])

    @property
    def pair_ids(self) -> list[str]:
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, pair_id: object) -> bool:
        return str(pair_id) in self._row_of

    def __getitem__(self, index: int) -> CachedPair:
        return self.get(self._ids[index])

    def __iter__(self) -> Iterator[CachedPair]:
        return (self.get(pid) for pid in self._ids)

    def _shard(self, name: str) -> Any:
        if name not in self._shards:
            from safetensors import safe_open

            self._shards[name] = safe_open(str(self.folder / "shards" / name), framework="pt")
        return self._shards[name]

    def get(self, pair_id: str | int) -> CachedPair:
        """The pair ``pair_id`` (compared as a string)."""
        key = str(pair_id)
        if key not in self._row_of:
            raise KeyError(f"pair {key!r} is not in the cache {self.folder}")
        row = self._row_of[key]
        shard = self._shard(self.manifest["shard"][row])
        i, c = int(self.manifest["index"][row]), int(self.manifest["caption_index"][row])
        names = shard.keys()
        text_added = {n.split(".", 2)[2]: shard.get_slice(n)[c] for n in names if n.startswith("text.added.")}
        image_added = tuple({n.split(".", 2)[2]: shard.get_slice(n)[i] for n in names
                             if n.startswith(f"image{k}.added.")} for k in (0, 1))
        inversion = None
        if "image0.inversion" in names:
            inversion = (shard.get_slice("image0.inversion")[i], shard.get_slice("image1.inversion")[i])
        return CachedPair(
            pair_id=key, caption=self.manifest["caption"][row],
            latents=(shard.get_slice("image0.latents")[i], shard.get_slice("image1.latents")[i]),
            hidden_states=shard.get_slice("text.hidden_states")[c], text_added=text_added,
            image_added=image_added, labels=self.labels(key), inversion=inversion,  # type: ignore[arg-type]
        )

    @property
    def inversion(self) -> InversionSpec | None:
        """How the stored inversions were made (``None``: the cache has none)."""
        spec = self.info.get("inversion")
        return None if spec is None else InversionSpec(**spec)

    def labels(self, pair_id: str | int) -> dict[str, Any]:
        """The label columns of pair ``pair_id`` from the manifest (no tensor is read)."""
        key = str(pair_id)
        if key not in self._row_of:
            raise KeyError(f"pair {key!r} is not in the cache {self.folder}")
        row = self._row_of[key]
        return {col: self.manifest[col][row] for col in LABEL_COLUMNS if col in self.manifest}

    def empty_conditioning(self) -> Conditioning:
        """The empty prompt's text conditioning (a batch of 1; SDXL ``time_ids`` of the square default)."""
        from safetensors.torch import load_file

        tensors = load_file(str(self.folder / "empty.safetensors"))
        added = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("added.")}
        return Conditioning(tensors["hidden_states"], added or None)


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
    prepared = [prepare_image(im, family.resolution) for im in images]
    latents = [family.encode_images(torch.stack([p.pixels for p in prepared[i:i + batch_size]]))
               for i in range(0, len(prepared), batch_size)]
    return (torch.cat(latents).cpu(), [p.original_size for p in prepared], [p.crop_top_left for p in prepared])


def _encode_captions(family: FamilyAdapter, captions: list[str], batch_size: int) -> Conditioning:
    parts = [family.encode_prompts(captions[i:i + batch_size]) for i in range(0, len(captions), batch_size)]
    return Conditioning.cat(parts).to("cpu")


def _store(tensor: Tensor) -> Tensor:
    return tensor.to(STORAGE_DTYPE).contiguous() if tensor.is_floating_point() else tensor.contiguous()


def invert_images(family: FamilyAdapter, latents: Tensor, cond: Conditioning, spec: InversionSpec,
                  batch_size: int, network: Any = None) -> Tensor:
    """The reference's (``network``, default ``family.unet``) inversion of ``latents`` at the grid
    levels, ``[N, L, C, h, w]`` on the CPU, as the objective's ``noise_latents`` would compute it
    with these settings."""
    from smpo.inversion import invert_to_levels

    uncond = None
    if spec.guidance != 1.0:
        uncond = cond.drop_text(torch.ones(len(cond), dtype=torch.bool), family.encode_prompts([""]))
    parts = []
    for i in range(0, latents.shape[0], batch_size):
        rows = slice(i, i + batch_size)
        eps_fn = family.eps_fn(family.unet if network is None else network, cond.index(rows),
                               None if uncond is None else uncond.index(rows), spec.guidance)
        x0 = latents[rows].to(family.device, torch.float32)
        with torch.no_grad():
            parts.append(invert_to_levels(eps_fn, x0, family.alphas_cumprod, num_steps=spec.steps,
                                          renoise_iters=spec.renoise_iters, land_on_t=spec.land_on_t,
                                          initial_abar=family.initial_abar).cpu())
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

    ``inversion``: also store each image's inversion by ``family.unet`` (the frozen reference).

    Human ties are kept (a labelled set's winner comes from the reward model). Pairs whose image
    cannot be decoded are skipped and listed in the summary. Resumes an unfinished ``out`` made
    with the same settings; ``overwrite`` starts again.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from smpo.data.pairs import iter_shards, pairs_in_table
    from smpo.data.schema import ReadStats
    from smpo.data.sources import open_source

    source = open_source(data, split=split, limit=limit)
    info = {"version": CACHE_VERSION, "family": family.name, "model": model, "resolution": family.resolution,
            "prediction_type": family.prediction_type, "shard_size": shard_size, "source": str(data),
            "split": split, "limit": limit, "storage_dtype": "float16",
            "inversion": None if inversion is None else asdict(inversion)}
    if inversion is not None and family.unet is None:
        raise ValueError("storing the inversion needs the reference UNet (load the family with its UNet)")
    if inversion is not None and family.prediction_type_family != "diffusion":
        raise ValueError(f"--store-inversion stores DDIM inversions (SD1.5, SDXL); the {family.name} family "
                         "inverts its flow at training time")
    folder = prepare_output_dir(out, overwrite=overwrite, resume=True)
    _check_resume(folder, info)
    write_json(folder / "cache.json", info)
    if source.num_rows is not None:
        print(f"smpo cache: {source.description}: disk estimate {_disk_estimate(source.num_rows, family, inversion)}",
              flush=True)
    else:
        print(f"smpo cache: {source.description}: a stream of unknown length; disk estimate "
              f"{bytes_per_pair(family, inversion) / 2**10:.1f} KiB per pair", flush=True)
    with atomic_path(folder / "empty.safetensors") as tmp:
        empty = family.encode_prompts([""]).to("cpu")
        save_file({"hidden_states": _store(empty.hidden_states),
                   **{f"added.{k}": v.float().contiguous() for k, v in (empty.added or {}).items()}}, str(tmp))

    shard_dir = folder / "shards"
    shard_dir.mkdir(exist_ok=True)
    done = {int(path.name[6:11]) for path in shard_dir.glob("shard-?????.safetensors")}
    summary = CacheSummary(shards_reused=len(done))
    total = source.num_rows
    bar = tqdm(total=total, unit="pair", desc="smpo cache", disable=not progress)
    for k, first_row, table in iter_shards(source, shard_size, wanted=lambda k: k not in done):
        stats = ReadStats()
        pairs = list(pairs_in_table(source, table, first_row, keep_ties=True, stats=stats))
        tensors = encode_shard(family, pairs, batch_size=batch_size, inversion=inversion) if pairs else {}
        meta = {"rows": json.dumps(_shard_rows(pairs)), "skipped": json.dumps(stats.to_dict()["skipped"])}
        with atomic_path(shard_dir / _shard_name(k)) as tmp:
            save_file(tensors or {"empty": torch.zeros(0)}, str(tmp), metadata=meta)
        summary.shards_written += 1
        bar.update(table.num_rows)
    bar.close()
    _write_manifest(folder, summary)
    print(f"smpo cache: {summary.pairs} pairs in {folder} ({summary.shards_written} shards written, "
          f"{summary.shards_reused} reused); skipped {len(summary.skipped)}", flush=True)
    for skipped in summary.skipped[:20]:
        print(f"  skipped pair {skipped['pair_id']} (row {skipped['row']}): {skipped['reason']}")
    return summary


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _check_resume(folder: Path, info: dict[str, Any]) -> None:
    previous = folder / "cache.json"
    if not previous.is_file():
        return
    old = read_json(previous)
    differing = sorted(k for k in info if old.get(k) != info[k])
    if differing:
        raise ValueError(f"{folder} holds a cache made with other settings ({', '.join(differing)} differ); "
                         "pass --overwrite to start again")


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="labelled dataset (output of `smpo label`: a folder of parquet shards), "
                        "or any source the pair reader takes")
    parser.add_argument("--model", required=True, help="diffusers pipeline folder or hub id (its VAE and text encoders)")
    parser.add_argument("--output", "--out", dest="out", required=True, help="output folder")
    parser.add_argument("--family", default="auto", choices=["auto", "sd15", "sdxl", "sd3", "flux"],
                        help="model family (default: auto, from model_index.json)")
    parser.add_argument("--vae", default=None, help="separate VAE folder or hub id (e.g. madebyollin/sdxl-vae-fp16-fix)")
    parser.add_argument("--revision", default=None, help="hub revision of --model")
    parser.add_argument("--variant", default=None, help="weights variant of --model (e.g. fp16)")
    parser.add_argument("--split", default="train", help="split of the source (default: train)")
    parser.add_argument("--limit", type=int, default=None, help="cache only the first N rows")
    parser.add_argument("--resolution", type=int, default=None,
                        help="pixel size of the square crop (default: the model's, e.g. 512 SD1.5, 1024 SDXL)")
    parser.add_argument("--shard-size", type=int, default=1000, help="pairs per shard file (default: 1000)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per VAE / text-encoder call (default: 8)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: the best available)")
    parser.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 for encoding (default: fp16 on CUDA, else fp32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    inv = parser.add_argument_group("stored reference inversion (for SmPO with inverting_network: reference)")
    inv.add_argument("--store-inversion", action="store_true",
                     help="also store each image's inversion by the frozen reference UNet at the grid levels (fp16)")
    inv.add_argument("--unet", default=None, help="the reference UNet, when not the pipeline's (e.g. an SFT-tuned one)")
    inv.add_argument("--inversion-steps", type=int, default=5, help="inversion grid size (default 5; SDXL recipes: 10)")
    inv.add_argument("--renoise-iters", type=int, default=1, help="ReNoise iterations per step (default 1; 0: DDIM)")
    inv.add_argument("--land-on-t", action=argparse.BooleanOptionalAction, default=False,
                     help="the objective's land_on_t (default: false, the authors' grid)")
    inv.add_argument("--inversion-guidance", type=float, default=1.0, help="CFG weight of the inversion (default 1)")
    inv.add_argument("--size-conditioning", choices=["image", "target"], default="image",
                     help="SDXL time ids the inversion conditions on: the training's data.size_conditioning")


def run(args: argparse.Namespace) -> int:
    from smpo.models.family import load_family

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    inversion = None
    if args.store_inversion:
        if args.inversion_steps < 1 or args.renoise_iters < 0:
            raise ValueError(f"--inversion-steps must be >= 1 and --renoise-iters >= 0; got {args.inversion_steps} "
                             f"and {args.renoise_iters}")
        inversion = InversionSpec(unet=model_identity(args.unet or args.model), steps=args.inversion_steps,
                                  renoise_iters=args.renoise_iters, land_on_t=args.land_on_t,
                                  guidance=args.inversion_guidance, size_conditioning=args.size_conditioning)
    elif args.unet:
        raise ValueError("--unet is the reference of --store-inversion; the latents need only --model")
    family = load_family(args.model, family=args.family, vae=args.vae, unet=args.unet, revision=args.revision,
                         variant=args.variant, dtype=dtype, device=device, with_unet=inversion is not None)
    if args.resolution is not None:
        family.resolution = args.resolution
    build_cache(args.data, args.out, family, model=str(args.model), shard_size=args.shard_size,
                batch_size=args.batch_size, overwrite=args.overwrite, split=args.split, limit=args.limit,
                progress=not args.no_progress, inversion=inversion)
    return 0

