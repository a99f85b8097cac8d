"""Data order, the split across processes and accumulation passes, and per-pair randomness."""

from __future__ import annotations

import pytest
import torch

from smpo.train.data import LabelledPairs, Layout, epoch_order, pair_draws, pair_generator, winner_of


def _step_pairs(layout: Layout, seed: int, step: int) -> list[list[int]]:
    return [layout.indices(seed, step, rank, micro)
            for micro in range(layout.accumulation) for rank in range(layout.num_processes)]


def test_a_step_takes_the_same_pairs_whatever_the_split():
    one = Layout(num_pairs=10, batch_size=1, num_processes=1, accumulation=4)
    two = Layout(num_pairs=10, batch_size=1, num_processes=2, accumulation=2)
    four = Layout(num_pairs=10, batch_size=2, num_processes=2, accumulation=1)
    assert one.global_batch == two.global_batch == four.global_batch == 4
    assert one.steps_per_epoch == 2  # 10 // 4: the 2 left-over pairs of an epoch are dropped
    for step in range(5):
        flat = sorted(sum(_step_pairs(one, 7, step), []))
        assert flat == sorted(sum(_step_pairs(two, 7, step), [])) == sorted(sum(_step_pairs(four, 7, step), []))
        assert len(set(flat)) == 4
    # Step s of epoch e takes the slice [4 (s mod 2), 4 (s mod 2) + 4) of that epoch's permutation.
    order = epoch_order(10, 7, 1).tolist()
    assert sorted(sum(_step_pairs(two, 7, 3), [])) == sorted(order[4:8])
    assert _step_pairs(two, 7, 3) == [[order[4]], [order[5]], [order[6]], [order[7]]]


def test_epochs_are_seeded_permutations():
    a, b = epoch_order(50, 0, 0), epoch_order(50, 0, 1)
    assert sorted(a.tolist()) == list(range(50))
    assert a.tolist() == epoch_order(50, 0, 0).tolist()
    assert a.tolist() != b.tolist() and a.tolist() != epoch_order(50, 1, 0).tolist()


def test_too_small_a_dataset_is_named():
    with pytest.raises(ValueError, match="3 pairs, fewer than one global batch of 4"):
        Layout(3, 2, 1, 2).indices(0, 0, 0, 0)


def test_pair_draws_depend_on_seed_pair_and_epoch_only():
    draws = [pair_draws(0, f"p{i}", 0, empty_prompt_rate=0.2, random_flip=True) for i in range(400)]
    assert draws[5] == pair_draws(0, "p5", 0, empty_prompt_rate=0.2, random_flip=True)
    assert draws[5].noise_seed != pair_draws(0, "p5", 1, empty_prompt_rate=0.2, random_flip=True).noise_seed
    assert draws[5].noise_seed != pair_draws(1, "p5", 0, empty_prompt_rate=0.2, random_flip=True).noise_seed
    dropped = sum(d.drop_prompt for d in draws) / 400
    flipped = sum(d.flip for d in draws) / 400
    assert 0.14 < dropped < 0.26 and 0.42 < flipped < 0.58  # rates 0.2 and 0.5, +-3 standard errors
    assert not any(pair_draws(0, f"p{i}", 0, empty_prompt_rate=0.2, random_flip=False).flip for i in range(50))
    assert not any(pair_draws(0, f"p{i}", 0, empty_prompt_rate=0.0, random_flip=True).drop_prompt for i in range(50))


def test_pair_draws_are_the_first_draw_of_each_streams_generator():
    """Each choice is the first float32 uniform of ``pair_generator(seed, pair, epoch, stream)``
    compared, as float32 tensors, with its rate."""
    for rate in (0.2, 0.1, 0.37):
        for i in range(300):
            d = pair_draws(3, f"q{i}", 2, empty_prompt_rate=rate, random_flip=True, flip_per_image=True)

            def first(stream: str, pair: str = f"q{i}") -> torch.Tensor:
                return torch.rand((), generator=pair_generator(3, pair, 2, stream))

            assert d.drop_prompt == bool(first("prompt") < torch.tensor(rate, dtype=torch.float32))
            assert d.flip == bool(first("flip") < 0.5)
            assert d.image_flips == (bool(first("flip-0") < 0.5), bool(first("flip-1") < 0.5))


def test_winner_and_probability():
    row = {"pair_id": "a", "winner": 1, "p_win": 0.6, "label_0": 1.0}
    assert winner_of(row, "smoothed") == (1, 0.6)  # the reward model's choice
    assert winner_of(row, "binary") == (0, 1.0)  # the human label
    assert winner_of({"pair_id": "b", "winner": 1, "p_win": 0.7}, "binary") == (1, 1.0)
    with pytest.raises(ValueError, match="pair 'c' has no winner/p_win"):
        winner_of({"pair_id": "c", "label_0": 0.0}, "smoothed")


def test_labelled_pairs_read_rows_and_drop_ties(labelled, tmp_path):
    pairs = LabelledPairs(labelled)
    assert len(pairs) == 8 and pairs.meta["pair_id"][:2] == ["p000", "p001"]
    row = pairs.rows([3])[0]
    assert row["pair_id"] == "p003" and row["winner"] == 1 and row["jpg_1"][:2] == b"\xff\xd8"
    assert len(LabelledPairs(labelled, max_pairs=5)) == 5
    import pyarrow.dataset as ds

    everything = ds.dataset(str(labelled), format="parquet").to_table().to_pylist()
    for index, got in zip([6, 0, 3], pairs.rows([6, 0, 3])):  # in the order asked, across shards
        assert (got["pair_id"], got["jpg_0"], got["jpg_1"]) == tuple(everything[index][k] for k in ("pair_id", "jpg_0", "jpg_1"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(labelled.glob("*.parquet"))[0]).to_pylist()
    table[1]["label_0"] = 0.5
    (tmp_path / "d").mkdir()
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "d" / "s.parquet")
    kept = LabelledPairs(tmp_path / "d", drop_ties=True)
    assert kept.meta["pair_id"] == ["p000", "p002", "p003"]
    assert kept.rows([1])[0]["jpg_0"] == table[2]["jpg_0"]  # images follow the kept rows
    pq.write_table(pa.Table.from_pylist([{"caption": "x", "jpg_0": b""}]), tmp_path / "d" / "s.parquet")
    with pytest.raises(ValueError, match="missing column"):
        LabelledPairs(tmp_path / "d")


def test_images_are_read_by_row_group_across_files_in_any_order(tmp_path):
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d").mkdir()
    n = 0
    for f, rows in enumerate((7, 1, 12)):  # groups of 3: partial last groups, a one-row file
        ids = list(range(n, n + rows))
        pq.write_table(pa.table({"pair_id": [f"p{i}" for i in ids], "caption": [f"c{i}" for i in ids],
                                 "jpg_0": [f"a{i}".encode() for i in ids], "jpg_1": [f"b{i}".encode() for i in ids],
                                 "label_0": [0.5 if i % 5 == 0 else 1.0 for i in ids]}),
                       tmp_path / "d" / f"shard-{f}.parquet", row_group_size=3)
        n += rows
    pairs = LabelledPairs(tmp_path / "d", drop_ties=True)
    kept = [i for i in range(n) if i % 5 != 0]
    assert len(pairs) == len(kept)
    order = list(range(len(kept)))
    random.Random(0).shuffle(order)
    for start in range(0, len(order), 4):
        batch = order[start:start + 4]
        for row, j in zip(pairs.rows(batch), batch):
            i = kept[j]
            assert (row["pair_id"], row["jpg_0"], row["jpg_1"]) == (f"p{i}", f"a{i}".encode(), f"b{i}".encode())
