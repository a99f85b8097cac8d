"""Training data: pair sources, the data order, and the randomness of each pair.

What is trained must not depend on how the work is split. So

- the data order of an epoch is a permutation drawn from ``(seed, epoch)`` alone;
- optimizer step ``s`` takes the next ``G = batch x processes x accumulation`` pairs of that
  order, and cuts them into equal micro-batches; process ``r`` at accumulation pass ``a`` gets
  micro-batch ``a * processes + r`` (every pair appears exactly once per step);
- every random choice about a pair (its timestep, its noise, whether its caption is dropped,
  whether its images are flipped) comes from ``(seed, pair_id, epoch)``, never from a process's
  random state.

Then 2 processes x accumulation 1 and 1 process x accumulation 2 compute the same gradient (the
mean over the same pairs of the same per-pair losses), and a resumed run replays exactly the pairs
and draws of an uninterrupted one: the data position is just the step count.

Two sources of pairs: a labelled dataset (``smpo label`` output: parquet shards with ``jpg_0``,
``jpg_1``, ``caption``, ``winner``, ``p_win``, ``label_0``...; images decoded and resized here,
encoded by the VAE in the loop) and a ``smpo cache`` folder (latents and text embeddings ready).
An unpaired method draws single images from either (`smpo.train.unpaired`).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smpo.batch import PairBatch, derive_seed
from smpo.labels import is_tie, winner_of
from smpo.methods import BatchKind, get_method
from smpo.models import Conditioning, crop_image, image_pixels
from smpo.train.labelled import LabelledPairs
from smpo.train.unpaired import KTOImages

# ---------------------------------------------------------------------------------------------
# Randomness and order


def pair_generator(seed: int, pair_id: Any, epoch: int, stream: str) -> torch.Generator:
    """A CPU generator for one random choice ``stream`` ("prompt", "flip", ...) of one pair."""
    return torch.Generator().manual_seed(derive_seed(seed, pair_id, epoch, stream))


@functools.lru_cache(maxsize=2)
def epoch_order(num_pairs: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded permutation of ``range(num_pairs)`` for one epoch (kept: every micro-batch of the
    epoch reads it, and on a million pairs it costs 24 ms to draw)."""
    order = np.random.default_rng(derive_seed(seed, "order", epoch)).permutation(num_pairs)
    order.flags.writeable = False
    return order


@dataclass(frozen=True)
class Layout:
    """How one optimizer step's pairs are split among processes and accumulation passes."""

    num_pairs: int
    batch_size: int  # pairs per process per pass
    num_processes: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return self.num_pairs // self.global_batch

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, seed: int, step: int, rank: int, micro: int) -> list[int]:
        """Dataset indices of micro-batch ``micro`` of process ``rank`` at optimizer step ``step``
        (0-based). The last incomplete global batch of an epoch is dropped."""
        if self.steps_per_epoch == 0:
            raise ValueError(f"the dataset has {self.num_pairs} pairs, fewer than one global batch "
                             f"of {self.global_batch} (batch x processes x accumulation)")
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch + (micro * self.num_processes + rank) * self.batch_size
        return [int(i) for i in epoch_order(self.num_pairs, seed, epoch)[start:start + self.batch_size]]


# ---------------------------------------------------------------------------------------------
# Per-pair draws and batches


@dataclass(frozen=True)
class PairDraws:
    """The random choices about one pair in one epoch, all derived from ``(seed, pair_id, epoch)``."""

    flip: bool
    drop_prompt: bool
    noise_seed: int  # seeds the pair's timestep and noise (``PairBatch.seeds``)
    image_flips: tuple[bool, bool] | None = None  # per-image flips of images 0 and 1 (``flip_per_image``)

    def flip_of(self, side: int) -> bool:
        """Whether image ``side`` (0 or 1, in the dataset's order) is mirrored."""
        return self.flip if self.image_flips is None else self.image_flips[side]


_DRAWS = threading.local()


def pair_draws(seed: int, pair_id: Any, epoch: int, *, empty_prompt_rate: float, random_flip: bool,
               flip_per_image: bool = False) -> PairDraws:
    """The draws of pair ``pair_id`` (compared as a string, as the cache stores it) in ``epoch``.

    ``flip_per_image``: each image of the pair gets its own flip (the authors' per-image
    transform) instead of one flip for both.
    """
    pair_id = str(pair_id)

    def below(stream: str, threshold: float) -> bool:
        """Whether the first uniform draw of ``pair_generator(seed, pair_id, epoch, stream)`` (a
        float32 tensor, compared as one) is below ``threshold``; from one reseeded generator per
        thread (building a generator per draw cost more than the draw)."""
        generator = getattr(_DRAWS, "generator", None)
        if generator is None:
            generator = _DRAWS.generator = torch.Generator()
        generator.manual_seed(derive_seed(seed, pair_id, epoch, stream))
        # The float32 draw against the threshold rounded to float32 (as a tensor comparison rounds
        # it), compared exactly as Python floats: a tensor comparison costs twice the draw.
        return torch.rand((), generator=generator).item() < float(np.float32(threshold))

    flip = random_flip and below("flip", 0.5)
    image_flips = (random_flip and below("flip-0", 0.5), random_flip and below("flip-1", 0.5)) if flip_per_image else None
    drop = below("prompt", empty_prompt_rate)
    return PairDraws(flip=flip, drop_prompt=drop, noise_seed=derive_seed(seed, pair_id, epoch, "noise"),
                     image_flips=image_flips)


@dataclass
class PreparedImages:
    """A micro-batch of a labelled dataset before the encoders (`ImagePairs.prepare`): per image,
    winner then loser of each pair, its pixels (or stored latents) and micro-conditioning."""

    epoch: int
    pixels: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    """``[2B, 3, R, R]`` in [-1, 1], flipped where drawn; with data.stored_latents the ``[2B, C, h, w]`` latents."""
    images: list[tuple[str, int]] = field(default_factory=list)  # (pair_id, side) of each image
    sizes: list[tuple[int, int]] = field(default_factory=list)
    crops: list[tuple[int, int]] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)  # per pair, from here on
    drops: list[bool] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    p_wins: list[float] = field(default_factory=list)


class ImagePairs:
    """Batches from a labelled dataset: decode, resize, centre-crop, flip, then VAE and text encoders."""

    def __init__(self, labelled: LabelledPairs, family: Any, *, resolution: int, seed: int,
                 empty_prompt_rate: float, random_flip: bool, labels: str, size_conditioning: str = "image",
                 flip_per_image: bool = False, vae_sample: bool = False, stored_latents: bool = False):
        self.labelled, self.family, self.resolution = labelled, family, resolution
        self.seed, self.empty_prompt_rate, self.random_flip, self.labels = seed, empty_prompt_rate, random_flip, labels
        self.size_conditioning, self.flip_per_image, self.vae_sample = size_conditioning, flip_per_image, vae_sample
        self.stored_latents = stored_latents
        if stored_latents:
            if vae_sample:
                raise ValueError("data.stored_latents and data.vae_sample exclude each other: stored latents are "
                                 "not encoded")
            labelled.rows([], images=False, latents=True)  # a set without latents fails here, naming itself
        self.uncond = family.encode_prompts([""])

    def __len__(self) -> int:
        return len(self.labelled)

    def pair_meta(self) -> list[dict[str, Any]]:
        """Every pair's label columns (no images), in dataset order."""
        return self.labelled.rows(list(range(len(self.labelled))), images=False)

    def batch(self, indices: list[int], epoch: int) -> PairBatch:
        return self.encode(self.prepare(indices, epoch))

    def prepare(self, indices: list[int], epoch: int) -> PreparedImages:
        """The micro-batch's CPU work: read, decode, crop, flip, convert (or read stored latents).
        It touches no network, so `smpo.train.prefetch` runs it ahead in worker processes."""
        from smpo.data.pairs import decode_image

        rows = self.labelled.rows(indices, images=not self.stored_latents, latents=self.stored_latents)
        out = PreparedImages(epoch=epoch)
        squares, flips, stored = [], [], []
        for row in rows:
            draws = pair_draws(self.seed, row["pair_id"], epoch, empty_prompt_rate=self.empty_prompt_rate,
                               random_flip=self.random_flip, flip_per_image=self.flip_per_image)
            winner, p_win = winner_of(row, self.labels)
            for side in (winner, 1 - winner):
                out.images.append((row["pair_id"], side))
                if self.stored_latents:
                    x0 = self._stored_latent(row, side)
                    stored.append(x0.flip(-1) if draws.flip_of(side) else x0)
                    out.sizes.append((self.resolution, self.resolution))
                    out.crops.append((0, 0))
                    continue
                try:
                    image = decode_image(row[f"jpg_{side}"])
                except Exception as err:  # noqa: BLE001 - name the pair, whatever the decoder raised
                    raise ValueError(f"{self.labelled.folder}: pair {row['pair_id']!r}: jpg_{side} cannot be "
                                     f"decoded ({err})") from err
                square, original, crop = crop_image(image, self.resolution)
                squares.append(square)
                flips.append(draws.flip_of(side))
                out.sizes.append(original)
                out.crops.append(crop)
            out.captions.append(row["caption"] or "")
            out.drops.append(draws.drop_prompt)
            out.seeds.append(draws.noise_seed)
            out.p_wins.append(p_win)
        out.pixels = torch.stack(stored) if self.stored_latents else image_pixels(squares, flips)
        return out

    def encode(self, prepared: PreparedImages) -> PairBatch:
        """The `PairBatch` of a prepared micro-batch: the VAE (unless its latents were stored) and
        the text encoders on the model's device."""
        p, family = prepared, self.family
        if self.stored_latents:
            latents = p.pixels.to(family.device)
        else:
            generators = ([pair_generator(self.seed, pair_id, p.epoch, f"posterior-{side}") for pair_id, side in p.images]
                          if self.vae_sample else None)
            latents = family.encode_images(p.pixels.to(family.device), sample=self.vae_sample, generators=generators)
        if self.size_conditioning == "target":  # the authors' fixed (R, R, 0, 0, R, R) for every image
            cond = family.encode_prompts(p.captions)
            return make_pair_batch(family, latents[0::2], latents[1::2], cond, p.drops, self.uncond, p.p_wins, p.seeds)
        cond = family.encode_prompts(p.captions, original_sizes=p.sizes[0::2], crops_coords=p.crops[0::2])
        return make_pair_batch(family, latents[0::2], latents[1::2], cond, p.drops, self.uncond, p.p_wins, p.seeds,
                               sizes_l=p.sizes[1::2], crops_l=p.crops[1::2])

    def _stored_latent(self, row: dict[str, Any], side: int) -> torch.Tensor:
        """Image ``side``'s stored latent, checked against the training resolution and the model."""
        from smpo.data.pair_images import latent_from_bytes

        shape = tuple(row[f"latent_shape_{side}"])
        wanted = (self.family.latent_channels, self.resolution // self.family.vae_scale_factor,
                  self.resolution // self.family.vae_scale_factor)
        if shape != wanted:
            raise ValueError(f"{self.labelled.folder}: pair {row['pair_id']!r}: latent_{side} has shape {shape}, "
                             f"but this model at {self.resolution} px takes {wanted}; train at the generators' "
                             "size or without data.stored_latents")
        return latent_from_bytes(row[f"latent_{side}"], shape)


def make_pair_batch(family: Any, latents_w: torch.Tensor, latents_l: torch.Tensor, cond: Any, drops: list[bool],
                    uncond: Any, p_wins: list[float], seeds: list[int], *, cond_l: Any = None,
                    sizes_l: list | None = None, crops_l: list | None = None) -> PairBatch:
    """A `PairBatch`; captions are dropped where ``drops`` (SDXL keeps its time ids).

    The losers' conditioning is ``cond_l`` when given, else (SDXL) the winners' text with the
    losers' own ``sizes_l``/``crops_l`` time ids, else the winners' (SD1.5).
    """
    device = latents_w.device
    mask = torch.tensor(drops, dtype=torch.bool)
    uncond = uncond.to(device, torch.float32)
    cond = cond.to(device, torch.float32).drop_text(mask, uncond)
    if cond_l is not None:
        cond_l = cond_l.to(device, torch.float32).drop_text(mask, uncond)
    elif cond.added is not None and sizes_l is not None:
        cond_l = family.image_conditioning(cond, original_sizes=sizes_l, crops_coords=crops_l)
    return PairBatch(latents_w=latents_w, latents_l=latents_l, cond=cond, cond_l=cond_l,
                     p_win=torch.tensor(p_wins, dtype=torch.float32, device=device), seeds=seeds, uncond=uncond)


class CachedPairs:
    """Batches from a ``smpo cache`` folder: stored latents and conditioning, no image, VAE or text encoder.

    The random flip mirrors the stored latents (close to, not exactly, the latents of the mirrored
    image: the VAE is not exactly equivariant); disable it with ``--no-random-flip``.
    """

    def __init__(self, folder: str | Path, family: Any, *, max_pairs: int | None, seed: int,
                 empty_prompt_rate: float, random_flip: bool, labels: str, size_conditioning: str = "image",
                 flip_per_image: bool = False, inversion: bool = False):
        from smpo.data.latent_cache import LatentCache

        self.cache = LatentCache(folder)
        if self.cache.family != family.name:
            raise ValueError(f"the cache {folder} was made for a {self.cache.family} model, not {family.name}")
        self.family, self.size_conditioning, self.flip_per_image = family, size_conditioning, flip_per_image
        self.seed, self.empty_prompt_rate, self.random_flip, self.labels = seed, empty_prompt_rate, random_flip, labels
        ids = self.cache.pair_ids[:max_pairs]
        if labels == "binary" and "label_0" in self.cache.manifest:
            ties = {str(p) for p, lab in zip(self.cache.manifest["pair_id"], self.cache.manifest["label_0"])
                    if is_tie(lab)}
            ids = [p for p in ids if p not in ties]
        self.pair_ids = ids
        self.uncond = self.cache.empty_conditioning()
        self.inversion = inversion  # attach the stored reference inversions (data.cached_inversion)

    def __len__(self) -> int:
        return len(self.pair_ids)

    def pair_meta(self) -> list[dict[str, Any]]:
        """Every pair's label columns, in this source's order (the cache keeps no image uids)."""
        return [{"pair_id": pid, **self.cache.labels(pid)} for pid in self.pair_ids]

    def batch(self, indices: list[int], epoch: int) -> PairBatch:
        latents_w, latents_l, conds_w, conds_l, drops, seeds, p_wins = [], [], [], [], [], [], []
        inverted: tuple[list, list] = ([], [])
        for i in indices:
            pair = self.cache.get(self.pair_ids[i])
            draws = pair_draws(self.seed, pair.pair_id, epoch, empty_prompt_rate=self.empty_prompt_rate,
                               random_flip=self.random_flip, flip_per_image=self.flip_per_image)
            winner, p_win = winner_of({"pair_id": pair.pair_id, **pair.labels}, self.labels)
            for k, (side, latents, conds) in enumerate(((winner, latents_w, conds_w), (1 - winner, latents_l, conds_l))):
                x0 = pair.latents[side].float()
                latents.append(x0.flip(-1) if draws.flip_of(side) else x0)
                conds.append(pair.conditioning(side))
                if self.inversion:
                    assert pair.inversion is not None
                    stored = pair.inversion[side].float()
                    # Stored for the image as cached with its caption: a flip or a dropped prompt is inverted live.
                    inverted[k].append(torch.full_like(stored, float("nan")) if draws.flip_of(side) or draws.drop_prompt
                                       else stored)
            drops.append(draws.drop_prompt)
            seeds.append(draws.noise_seed)
            p_wins.append(p_win)
        device = self.family.device
        cond_w, cond_l = Conditioning.cat(conds_w), Conditioning.cat(conds_l)
        if self.size_conditioning == "target" and cond_w.added is not None:
            # The authors' fixed (R, R, 0, 0, R, R) for every image, whatever the stored size and crop.
            cond_w = self.family.image_conditioning(cond_w)
            batch = make_pair_batch(self.family, torch.stack(latents_w).to(device), torch.stack(latents_l).to(device),
                                    cond_w, drops, self.uncond, p_wins, seeds)
        else:
            batch = make_pair_batch(self.family, torch.stack(latents_w).to(device), torch.stack(latents_l).to(device),
                                    cond_w, drops, self.uncond, p_wins, seeds,
                                    cond_l=cond_l if cond_w.added is not None else None)
        if self.inversion:
            batch.inverted_w, batch.inverted_l = (torch.stack(v).to(device) for v in inverted)
        return batch


def open_pairs(config: Any, family: Any) -> Any:
    """The pair source of a run: a ``smpo cache`` folder when ``data.cache`` is set, else the dataset;
    for an unpaired method (KTO), the images drawn from it (`KTOImages`)."""
    source = _pair_source(config, family)
    if get_method(config.objective.method).batch_kind is BatchKind.UNPAIRED:
        return KTOImages(source, seed=config.run.seed, desirable_share=config.data.kto_desirable_share,
                         source=config.data.cache or config.data.dataset)
    return source


def _pair_source(config: Any, family: Any) -> Any:
    labels = config.objective.resolved().labels
    common = dict(seed=config.run.seed, empty_prompt_rate=config.data.empty_prompt_rate,
                  random_flip=config.data.random_flip, labels=labels, size_conditioning=config.data.size_conditioning,
                  flip_per_image=config.data.flip_per_image)
    if config.data.cache:
        if config.data.stored_latents:
            raise ValueError(f"data.stored_latents reads the latents of a --dataset made by `smpo pairs "
                             f"--keep-latents`; the cache {config.data.cache} holds its own")
        if config.data.vae_sample:
            raise ValueError(f"data.vae_sample needs the images: the cache {config.data.cache} stores posterior "
                             "means; train from --dataset instead")
        cached = CachedPairs(config.data.cache, family, max_pairs=config.data.max_pairs,
                             inversion=config.data.cached_inversion, **common)
        if config.data.cached_inversion:
            check_cached_inversion(config, cached.cache)
        wanted = config.data.resolution
        if wanted is not None and wanted != cached.cache.resolution:
            raise ValueError(f"the cache {config.data.cache} holds {cached.cache.resolution} px images, "
                             f"not the {wanted} px asked for with --resolution")
        return cached
    if config.data.cached_inversion:
        raise ValueError("data.cached_inversion reads the inversions a cache stores: set data.cache "
                         "(a folder made by `smpo cache --store-inversion`)")
    labelled = LabelledPairs(config.data.dataset, max_pairs=config.data.max_pairs, drop_ties=labels == "binary")
    return ImagePairs(labelled, family, resolution=config.data.resolution or family.resolution,
                      vae_sample=config.data.vae_sample, stored_latents=config.data.stored_latents, **common)


def check_cached_inversion(config: Any, cache: Any) -> None:
    """Raise ValueError unless the cache's stored inversions are what this run's objective computes."""
    spec = cache.inversion
    if spec is None:
        raise ValueError(f"data.cached_inversion: the cache {cache.folder} stores no inversion; "
                         "make it with `smpo cache --store-inversion`")
    objective = config.objective.resolved()
    if objective.noising == "forward" or objective.inverting_network != "reference" or objective.inversion_noise:
        raise ValueError("data.cached_inversion stores the reference's inversion: it needs objective.noising "
                         "renoise or ddim-inversion, objective.inverting_network=reference and no inversion_noise "
                         f"(got {objective.noising}, {objective.inverting_network}, {objective.inversion_noise})")
    reference = config.model.reference_unet or config.model.unet or config.model.pretrained
    differing = spec.mismatches(objective, config.data.size_conditioning, reference)
    if differing:
        raise ValueError(f"data.cached_inversion: the cache {cache.folder} was inverted with other settings "
                         f"({'; '.join(differing)}); remake it or change the run")
