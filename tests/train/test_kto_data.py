"""Diffusion-KTO's unpaired data: image-level labels and the weighted desirable sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smpo.batch import ImageBatch, PairBatch
from smpo.models import Conditioning
from smpo.train.unpaired import KTOImages


class FakePairs:
    """A pair source whose latents spell out (pair index, side): image ``side`` of pair ``i`` is
    filled with ``10 i + side``; its text states with ``i``."""

    def __init__(self, meta: list[dict]):
        self.meta = meta
        self.uncond = Conditioning(torch.zeros(1, 2, 3))
        self.asked: list[list[int]] = []

    def pair_meta(self) -> list[dict]:
        return self.meta

    def batch(self, indices: list[int], epoch: int) -> PairBatch:
        self.asked.append(list(indices))
        winners = [int(self.meta[i]["winner"]) for i in indices]
        lat_w = torch.stack([torch.full((1, 2, 2), 10.0 * i + w) for i, w in zip(indices, winners)])
        lat_l = torch.stack([torch.full((1, 2, 2), 10.0 * i + 1 - w) for i, w in zip(indices, winners)])
        cond = Conditioning(torch.stack([torch.full((2, 3), float(i)) for i in indices]))
        return PairBatch(latents_w=lat_w, latents_l=lat_l, cond=cond, p_win=torch.ones(len(indices)),
                         seeds=list(indices), uncond=self.uncond)


def _row(i: int, uid_0: str | None, uid_1: str | None, label_0: float) -> dict:
    row = {"pair_id": f"p{i}", "label_0": label_0, "winner": 0 if label_0 == 1.0 else 1}
    if uid_0 is not None:
        row["image_0_uid"], row["image_1_uid"] = uid_0, uid_1
    return row


def test_an_image_that_won_once_is_desirable():
    # a beats b, b beats c, d beats a: a won (and lost), b won (and lost), c only lost, d only won.
    meta = [_row(0, "a", "b", 1.0), _row(1, "c", "b", 0.0), _row(2, "a", "d", 0.0)]
    images = KTOImages(FakePairs(meta), seed=0, desirable_share=0.5)
    uids = ["a", "b", "c", "d"]  # first appearances: (0, 0), (0, 1), (1, 0), (2, 1)
    assert images.images == [(0, 0), (0, 1), (1, 0), (2, 1)]
    assert dict(zip(uids, images.desirable.tolist())) == {"a": True, "b": True, "c": False, "d": True}
    assert len(images) == 2  # 4 distinct images = 2 slots of two


def test_without_uids_each_side_is_its_own_image():
    meta = [_row(i, None, None, 1.0 if i % 2 else 0.0) for i in range(3)]
    images = KTOImages(FakePairs(meta), seed=0, desirable_share=0.5)
    assert len(images.images) == 6
    assert images.desirable.tolist() == [False, True, True, False, False, True]  # the winner of each pair


def test_the_sampler_sets_the_desirable_share():
    # 300 pairs: every winner is desirable, every loser not, plus 100 extra losers (pairs sharing a winner).
    meta = [_row(i, f"w{i % 200}", f"l{i}", 1.0) for i in range(300)]
    images = KTOImages(FakePairs(meta), seed=3, desirable_share=0.8)
    assert int(images.desirable.sum()) == 200 and len(images.desirable) == 500
    share = np.mean([images.desirable[images.draws(e)].mean() for e in range(20)])
    assert share == pytest.approx(0.8, abs=0.01)
    again = KTOImages(FakePairs(meta), seed=3, desirable_share=0.8)
    assert again.draws(4).tolist() == images.draws(4).tolist()  # (seed, epoch) alone decide
    assert again.draws(5).tolist() != images.draws(4).tolist()
    even = KTOImages(FakePairs(meta), seed=3, desirable_share=0.5)
    assert np.mean([even.desirable[even.draws(e)].mean() for e in range(20)]) == pytest.approx(0.5, abs=0.01)


def test_a_batch_holds_the_drawn_images():
    meta = [_row(0, "a", "b", 1.0), _row(1, "c", "b", 0.0), _row(2, "a", "d", 0.0), _row(3, "e", "f", 1.0)]
    source = FakePairs(meta)
    images = KTOImages(source, seed=1, desirable_share=0.5)
    batch = images.batch([0, 2], epoch=0)
    assert isinstance(batch, ImageBatch) and len(batch) == 4
    draws = images.draws(0)
    picked = [images.images[draws[p]] for p in (0, 1, 4, 5)]
    assert batch.latents[:, 0, 0, 0].tolist() == [10.0 * i + side for i, side in picked]
    assert batch.cond.hidden_states[:, 0, 0].tolist() == [float(i) for i, _ in picked]
    assert batch.desirable.tolist() == [bool(images.desirable[draws[p]]) for p in (0, 1, 4, 5)]
    assert len(source.asked[-1]) == len(set(i for i, _ in picked))  # each pair encoded once
    assert len(set(batch.seeds)) == 4  # own t and noise per drawn image, even for a repeat


def test_bad_kto_data_is_named():
    with pytest.raises(ValueError, match=r"kto_desirable_share must lie in \(0, 1\); got 1.0"):
        KTOImages(FakePairs([_row(0, "a", "b", 1.0)]), seed=0, desirable_share=1.0)
    all_winners = [_row(0, "a", "b", 1.0), _row(1, "b", "a", 1.0)]  # each image won once
    with pytest.raises(ValueError, match="data.parquet: KTO needs desirable and undesirable images; found 2 "
                                         "desirable and 0 undesirable"):
        KTOImages(FakePairs(all_winners), seed=0, desirable_share=0.5, source="data.parquet")
