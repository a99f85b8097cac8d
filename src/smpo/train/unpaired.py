"""Unpaired images drawn from a pair source, for the unpaired methods (Diffusion-KTO)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from smpo.batch import ImageBatch, derive_seed
from smpo.labels import winner_of
from smpo.models import Conditioning


class KTOImages:
    """Diffusion-KTO's unpaired images (ALGORITHM.md section 4) drawn from a pair source.

    Each distinct image (by ``image_{0,1}_uid`` when the dataset has them, as Pick-a-Pic does;
    else by pair and side) is desirable if it won at least one of its pairs under the binary
    labels (the authors' ``gt_label_wi_l`` policy: an image that both won and lost counts as
    desirable), undesirable if it only lost. Each epoch draws images with replacement so that the
    expected share of desirable ones is ``desirable_share`` (the authors' weighted sampler,
    ``--positive_ratio``). A "pair" of the training budget is two drawn images, so a KTO step
    costs what a DPO step of the same batch costs.

    The draws depend on ``(seed, epoch)`` alone and each image's t and noise on ``(seed, epoch,
    slot)``, so, as for the pairwise methods, the split among processes does not change them.
    """

    def __init__(self, pairs: Any, *, seed: int, desirable_share: float, source: str = "the dataset"):
        if not 0.0 < desirable_share < 1.0:
            raise ValueError(f"kto_desirable_share must lie in (0, 1); got {desirable_share}")
        self.pairs, self.seed = pairs, seed
        first: dict[str, tuple[int, int]] = {}
        won: dict[str, bool] = {}
        self.winner_side: list[int] = []
        for index, row in enumerate(pairs.pair_meta()):
            winner, _ = winner_of(row, "binary")
            self.winner_side.append(winner)
            for side in (0, 1):
                uid = str(row.get(f"image_{side}_uid") or f"{row['pair_id']}:{side}")
                first.setdefault(uid, (index, side))
                won[uid] = won.get(uid, False) or side == winner
        self.images = list(first.values())  # (pair index, side) of each distinct image
        self.desirable = np.array([won[uid] for uid in first], dtype=bool)
        n_good = int(self.desirable.sum())
        n_bad = len(self.desirable) - n_good
        if n_good == 0 or n_bad == 0:
            raise ValueError(f"{source}: KTO needs desirable and undesirable images; found {n_good} desirable "
                             f"and {n_bad} undesirable among {len(self.desirable)} images")
        self.weights = np.where(self.desirable, desirable_share / n_good, (1.0 - desirable_share) / n_bad)
        self._draws: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.images) // 2

    def draws(self, epoch: int) -> np.ndarray:
        """The epoch's image sequence (indices into ``self.images``), two per slot."""
        if epoch not in self._draws:
            rng = np.random.default_rng(derive_seed(self.seed, "kto-sampler", epoch))
            self._draws = {epoch: rng.choice(len(self.images), size=2 * len(self), p=self.weights)}
        return self._draws[epoch]

    def batch(self, indices: list[int], epoch: int) -> ImageBatch:
        draws = self.draws(epoch)
        positions = [2 * slot + k for slot in indices for k in (0, 1)]
        picks = [self.images[draws[p]] for p in positions]
        row_of = {i: j for j, i in enumerate(dict.fromkeys(i for i, _ in picks))}  # pair index -> batch row
        paired = self.pairs.batch(list(row_of), epoch)
        latents, conds, inverted = [], [], []
        for i, side in picks:
            j = row_of[i]
            is_winner = side == self.winner_side[i]
            latents.append(paired.latents_w[j] if is_winner else paired.latents_l[j])
            cond = paired.cond if is_winner or paired.cond_l is None else paired.cond_l
            conds.append(cond.index([j]))
            if paired.inverted is not None:
                inverted.append(paired.inverted_w[j] if is_winner else paired.inverted_l[j])
        desirable = torch.tensor([bool(self.desirable[draws[p]]) for p in positions], device=paired.latents_w.device)
        return ImageBatch(latents=torch.stack(latents), cond=Conditioning.cat(conds), desirable=desirable,
                          seeds=[derive_seed(self.seed, "kto", epoch, p) for p in positions], uncond=paired.uncond,
                          inverted=torch.stack(inverted) if inverted else None)
