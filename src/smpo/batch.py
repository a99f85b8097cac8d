"""What a training batch is, below both the data readers and the objective, and the seed of each pair.

A batch holds encoded latents and conditioning, winner first (`PairBatch`), or single images for
the unpaired methods (`ImageBatch`); `NoisedBatch` is what the objective's noising made of one.
Every random choice about a pair comes from `derive_seed` of its parts (run seed, pair id,
epoch, ...), so it is the same on every process and in every batch composition.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from smpo.models import Conditioning


@dataclass
class PairBatch:
    """``B`` preference pairs, winner first.

    ``cond``: the prompts' conditioning (for SDXL with the winners' size/crop ``time_ids``);
    ``cond_l``: the losers' when it differs (SDXL: their own ``time_ids``), else ``None``.
    ``p_win``: ``[B]`` smoothed probability that the winner is preferred (Eq. 11).
    ``seeds``: one per pair; the loop derives each from (run seed, pair id, epoch).
    ``uncond``: the empty prompt's conditioning, a batch of 1 (needed for inversion guidance != 1).
    ``inverted_w`` / ``inverted_l``: the reference's inversion of each image at the grid levels,
    ``[B, L, ...]``, when read from a cache made with ``smpo cache --store-inversion`` (NaN rows:
    none stored for that image as batched, e.g. flipped or with its prompt dropped; inverted live).
    """

    latents_w: Tensor
    latents_l: Tensor
    cond: Conditioning
    p_win: Tensor
    seeds: list[int]
    uncond: Conditioning | None = None
    cond_l: Conditioning | None = None
    inverted_w: Tensor | None = None
    inverted_l: Tensor | None = None

    def __len__(self) -> int:
        return self.latents_w.shape[0]

    def to(self, device: torch.device | str) -> PairBatch:
        """This batch with every tensor on ``device`` (dtypes kept)."""
        return PairBatch(latents_w=self.latents_w.to(device), latents_l=self.latents_l.to(device),
                         cond=self.cond.to(device), p_win=self.p_win.to(device), seeds=list(self.seeds),
                         uncond=None if self.uncond is None else self.uncond.to(device),
                         cond_l=None if self.cond_l is None else self.cond_l.to(device),
                         inverted_w=None if self.inverted_w is None else self.inverted_w.to(device),
                         inverted_l=None if self.inverted_l is None else self.inverted_l.to(device))

    @property
    def inverted(self) -> Tensor | None:
        """The stored inversions of the ``2B`` images, winners first (``None`` without a cache of them)."""
        if self.inverted_w is None or self.inverted_l is None:
            return None
        return torch.cat([self.inverted_w, self.inverted_l])

    def to_images(self) -> ImageBatch:
        """The ``2B`` images as an unpaired batch: winners desirable, losers undesirable (for KTO).

        Each image gets its own seed derived from its pair's (independent t and eps per image).
        """
        seeds = [derive_seed(s, 0) for s in self.seeds] + [derive_seed(s, 1) for s in self.seeds]
        desirable = torch.cat([torch.ones(len(self), dtype=torch.bool), torch.zeros(len(self), dtype=torch.bool)])
        return ImageBatch(latents=torch.cat([self.latents_w, self.latents_l]),
                          cond=Conditioning.cat([self.cond, self.cond_l if self.cond_l is not None else self.cond]),
                          desirable=desirable.to(self.latents_w.device), seeds=seeds, uncond=self.uncond,
                          inverted=self.inverted)


@dataclass
class ImageBatch:
    """``B`` single images for unpaired methods (Diffusion-KTO): ``desirable[i]`` is y in ALGORITHM.md section 4."""

    latents: Tensor
    cond: Conditioning
    desirable: Tensor
    seeds: list[int]
    uncond: Conditioning | None = None
    inverted: Tensor | None = None  # stored inversions at the grid levels, [B, L, ...] (see PairBatch)

    def __len__(self) -> int:
        return self.latents.shape[0]


@dataclass
class NoisedBatch:
    """The noised latents and the target noise of a batch (exposed for tests and diagnostics)."""

    x_t: Tensor
    t: Tensor
    eps: Tensor


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any hashable parts (e.g. ``(seed, pair_id, epoch, "noise")`` or ``(seed, k)``).

    Uses a cryptographic hash of the parts' text, so it is the same on every process, platform
    and Python run (``hash()`` of a string is salted per process).
    """
    text = "\x1f".join(repr(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1
