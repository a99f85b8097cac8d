"""Reading a ``smpo cache`` folder (:mod:`smpo.data.cache` writes it): :class:`LatentCache`, its
pairs (:class:`CachedPair`) and their training batches (:func:`pair_batch`), and what a stored
inversion was made with (:class:`InversionSpec`).

Layout of the output folder::

    cache.json                 what was cached and how (family, model, resolution, shard size, source)
    empty.safetensors          the empty prompt's conditioning (empty-prompt rate, inversion guidance)
    shards/shard-00000.safetensors   fp16 tensors; the pairs' ids and labels in its metadata
    manifest.parquet           one row per pair: pair_id, shard, index, label columns

Shards are written atomically (``smpo.io.atomic_path``): a killed job resumes at the first
missing shard; the manifest is written last.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from smpo.batch import PairBatch
from smpo.io import model_identity, read_json
from smpo.labels import human_winner
from smpo.models import Conditioning

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
        return human_winner(self.labels.get("label_0"))

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


@dataclass(frozen=True)
class _ShardLayout:
    """One shard's tensors by role, each the whole stored tensor (memory-mapped: safetensors'
    ``get_tensor`` maps the file, so indexing a pair reads only its pages)."""

    latents: tuple[Tensor, Tensor]
    hidden_states: Tensor
    text_added: list[tuple[str, Tensor]]
    image_added: tuple[list[tuple[str, Tensor]], list[tuple[str, Tensor]]]
    inversion: tuple[Tensor, Tensor] | None


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
        self._shards: dict[str, _ShardLayout] = {}

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

    def _shard(self, name: str) -> _ShardLayout:
        """A shard's tensors by role, opened once per shard (indexing a mapped tensor costs a
        tenth of reading one pair's slice through ``get_slice``)."""
        if name not in self._shards:
            from safetensors import safe_open

            with safe_open(str(self.folder / "shards" / name), framework="pt") as shard:
                tensors = {n: shard.get_tensor(n) for n in shard.keys()}

            def role(prefix: str) -> list[tuple[str, Tensor]]:
                return [(n[len(prefix):], v) for n, v in tensors.items() if n.startswith(prefix)]

            inversion = "image0.inversion" in tensors
            self._shards[name] = _ShardLayout(
                latents=(tensors["image0.latents"], tensors["image1.latents"]),
                hidden_states=tensors["text.hidden_states"], text_added=role("text.added."),
                image_added=(role("image0.added."), role("image1.added.")),
                inversion=(tensors["image0.inversion"], tensors["image1.inversion"]) if inversion else None)
        return self._shards[name]

    def get(self, pair_id: str | int) -> CachedPair:
        """The pair ``pair_id`` (compared as a string)."""
        key = str(pair_id)
        if key not in self._row_of:
            raise KeyError(f"pair {key!r} is not in the cache {self.folder}")
        row = self._row_of[key]
        shard = self._shard(self.manifest["shard"][row])
        i, c = int(self.manifest["index"][row]), int(self.manifest["caption_index"][row])
        return CachedPair(
            pair_id=key, caption=self.manifest["caption"][row],
            latents=(shard.latents[0][i], shard.latents[1][i]), hidden_states=shard.hidden_states[c],
            text_added={k: v[c] for k, v in shard.text_added},
            image_added=tuple({k: v[i] for k, v in names} for names in shard.image_added),  # type: ignore[arg-type]
            labels=self.labels(key),
            inversion=None if shard.inversion is None else (shard.inversion[0][i], shard.inversion[1][i]),
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
