"""The Pick-a-Pic-schema pair reader over each kind of source."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
from pickapic_testdata import CORRUPT_ROW, TIE_ROW, pickapic_rows, random_jpeg, write_parquet

from smpo.data.pairs import iter_pairs, iter_shards
from smpo.data.schema import MissingColumnsError, ReadStats
from smpo.data.sources import PairSource, ParquetSource, open_source

DECIDED = [i for i in range(12) if i not in (CORRUPT_ROW, TIE_ROW)]


def test_parquet_file_yields_pairs_drops_the_tie_and_names_the_corrupt_image(pickapic_parquet, rows):
    stats = ReadStats()
    pairs = list(iter_pairs(pickapic_parquet, stats=stats))

    assert [p.row for p in pairs] == DECIDED
    assert [p.pair_id for p in pairs] == [str(1000 + i) for i in DECIDED]  # ranking_id names the pairs
    first = pairs[0]
    assert first.caption == "a photo of object 0" and first.label_0 == 1.0 and pairs[1].label_0 == 0.0
    assert first.jpg_0 == rows[0]["jpg_0"] and first.jpg_1 == rows[0]["jpg_1"]
    assert first.image_0.size == (24, 20) and first.image_1.size == (20, 24) and first.image_0.mode == "RGB"
    assert first.extra == {"ranking_id": 1000, "user_id": 0, "label_1": 0.0, "model_0": "model-a",
                           "model_1": "model-b"}
    assert (stats.rows, stats.pairs, stats.ties) == (12, 10, 1)
    assert len(stats.skipped) == 1
    skipped = stats.skipped[0]
    assert (skipped.pair_id, skipped.row) == ("1004", CORRUPT_ROW)
    assert skipped.reason.startswith("cannot decode jpg_1:")
    assert str(skipped).startswith("pair 1004 (row 4): cannot decode jpg_1")


def test_keep_ties_yields_the_tie(pickapic_parquet):
    stats = ReadStats()
    pairs = list(iter_pairs(pickapic_parquet, keep_ties=True, stats=stats))
    assert [p.row for p in pairs if p.is_tie] == [TIE_ROW]
    assert (stats.pairs, stats.ties) == (11, 1)


def test_pair_ids_are_row_indices_without_an_id_column(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "ranking_id"} for row in pickapic_rows(4, corrupt_row=None)]
    path = write_parquet(tmp_path / "p.parquet", rows, schema=None)
    assert [p.pair_id for p in iter_pairs(path)] == ["0", "1", "2", "3"]


def test_parquet_folder_reads_only_the_split_in_order_across_files_and_row_groups(tmp_path):
    rows = pickapic_rows(12, corrupt_row=None, tie_row=None)
    write_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", rows[:7], row_group_size=3)
    write_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", rows[7:], row_group_size=2)
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", pickapic_rows(3))
    source = open_source(tmp_path, split="train")
    assert isinstance(source, ParquetSource) and source.num_rows == 12
    assert [p.row for p in iter_pairs(source)] == list(range(12))
    # rows 4..9 span both files and four row groups
    middle = pa.concat_tables(source.batches(4, 10))
    assert middle.column("ranking_id").to_pylist() == [1004 + i for i in range(6)]
    assert open_source(tmp_path, split="test").num_rows == 3
    assert open_source(tmp_path, limit=5).num_rows == 5


def test_shards_of_a_stream_equal_the_shards_of_random_access(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", pickapic_rows(11), row_group_size=4)

    class Stream(PairSource):  # a source of unknown length, like a streamed hub set
        def __init__(self):
            self.inner = ParquetSource(path)
            self.schema, self.num_rows, self.description = self.inner.schema, None, "stream"

        def batches(self, start=0, stop=None):
            yield from self.inner.batches(start, stop)

    stream = Stream()
    wanted = {0, 2}  # shards of 3 rows: 0..2 and 6..8
    from_stream = [(k, first, t.column("ranking_id").to_pylist()) for k, first, t in iter_shards(stream, 3, wanted.__contains__)]
    assert from_stream == [(0, 0, [1000, 1001, 1002]), (2, 6, [1006, 1007, 1008])]
    assert stream.num_rows == 11
    all_shards = [t.num_rows for _, _, t in iter_shards(Stream(), 3)]
    assert all_shards == [3, 3, 3, 2]
    assert [t.num_rows for _, _, t in iter_shards(ParquetSource(path), 3)] == [3, 3, 3, 2]


def test_save_to_disk_folder_dataset_and_dataset_dict(tmp_path):
    rows = pickapic_rows(6)
    dataset = datasets.Dataset.from_list(rows)
    dataset.save_to_disk(str(tmp_path / "single"))
    stats = ReadStats()
    assert [p.row for p in iter_pairs(tmp_path / "single", stats=stats)] == [0, 1, 2, 3, 5]
    assert stats.skipped[0].pair_id == "1004"

    datasets.DatasetDict({"train": dataset, "validation": datasets.Dataset.from_list(rows[:2])}).save_to_disk(
        str(tmp_path / "dict"))
    assert [p.pair_id for p in iter_pairs(tmp_path / "dict", split="validation")] == ["1000", "1001"]
    with pytest.raises(KeyError, match="no split 'test'"):
        open_source(tmp_path / "dict", split="test")


def test_image_feature_columns_are_read_as_bytes(tmp_path):
    rows = pickapic_rows(3, corrupt_row=None)
    features = datasets.Features({
        **{k: datasets.Value(v) for k, v in [("ranking_id", "int64"), ("user_id", "int64"), ("caption", "string"),
                                             ("label_0", "float64"), ("label_1", "float64"),
                                             ("model_0", "string"), ("model_1", "string")]},
        "jpg_0": datasets.Image(), "jpg_1": datasets.Image(),
    })
    for row in rows:
        row["jpg_0"], row["jpg_1"] = {"bytes": row["jpg_0"], "path": None}, {"bytes": row["jpg_1"], "path": None}
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "images"))
    pairs = list(iter_pairs(tmp_path / "images"))
    assert pairs[0].jpg_0 == rows[0]["jpg_0"]["bytes"] and pairs[0].image_1.size == (20, 24)


def test_jsonl_with_relative_image_paths_and_a_missing_file(tmp_path):
    (tmp_path / "img").mkdir()
    records = []
    for i in range(3):
        for side in (0, 1):
            (tmp_path / "img" / f"{i}_{side}.jpg").write_bytes(random_jpeg(10 * i + side))
        records.append({"prompt": f"prompt {i}", "image_0": f"img/{i}_0.jpg", "image_1": f"img/{i}_1.jpg",
                        "label_0": 1 - i % 2, "source": "mine"})
    records[1]["image_1"] = "img/missing.jpg"
    records[2]["note"] = "only here"  # a key absent from the first record is kept too
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))

    stats = ReadStats()
    pairs = list(iter_pairs(path, stats=stats))
    assert [p.pair_id for p in pairs] == ["0", "2"]
    assert pairs[0].caption == "prompt 0" and pairs[0].label_0 == 1.0 and pairs[1].label_0 == 1.0
    assert pairs[0].jpg_1 == (tmp_path / "img" / "0_1.jpg").read_bytes()
    assert pairs[0].extra == {"image_0": "img/0_0.jpg", "image_1": "img/0_1.jpg", "source": "mine", "note": None}
    assert pairs[1].extra["note"] == "only here"
    assert np.asarray(pairs[1].image_0).shape == (20, 24, 3)
    [skipped] = stats.skipped
    assert skipped.row == 1 and str(tmp_path / "img" / "missing.jpg") in skipped.reason


def test_jsonl_line_missing_a_field_names_line_expected_and_found(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "a", "image_0": "x.jpg", "image_1": "y.jpg", "label_0": 1}) + "\n"
                    + json.dumps({"prompt": "b", "image_0": "x.jpg", "label_0": 0}) + "\n")
    with pytest.raises(MissingColumnsError) as error:
        open_source(path)
    assert str(error.value) == (f"{path}, line 2, lacks column(s) 'image_1'; expected: prompt, image_0, image_1, "
                                "label_0; found: prompt, image_0, label_0")


def test_missing_parquet_column_lists_expected_and_found(tmp_path):
    rows = [{k: v for k, v in row.items() if k in ("ranking_id", "caption", "jpg_0", "jpg_1")}
            for row in pickapic_rows(2)]
    path = write_parquet(tmp_path / "bad.parquet", rows, schema=None)
    with pytest.raises(MissingColumnsError) as error:
        open_source(path)
    assert str(error.value) == (f"parquet {path} lacks column(s) 'label_0'; expected: caption, jpg_0, jpg_1, "
                                "label_0; found: ranking_id, caption, jpg_0, jpg_1")


def test_invalid_label_is_skipped_and_named(tmp_path):
    rows = pickapic_rows(3, corrupt_row=None, tie_row=None)
    rows[1]["label_0"] = 2.0
    stats = ReadStats()
    assert [p.row for p in iter_pairs(write_parquet(tmp_path / "p.parquet", rows), stats=stats)] == [0, 2]
    assert stats.skipped[0].reason == "label_0 is 2.0; expected 0, 0.5 or 1"


def test_unknown_local_path_is_not_taken_for_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(tmp_path / "nothing" / "here")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="expected a .parquet or .jsonl file"):
        open_source(tmp_path / "notes.txt")


def test_reader_is_lazy(pickapic_parquet):
    iterator = iter_pairs(pickapic_parquet)
    assert next(iterator).row == 0  # a generator, not a list: the full set is 335 GB
    assert isinstance(open_source(Path(pickapic_parquet)), ParquetSource)


def test_streamed_source_reads_like_the_parquet_it_streams(pickapic_parquet):
    # HubSource streams with datasets.load_dataset(name, split=..., streaming=True); a local folder stands
    # in for a hub id here (tests never download), through the same code.
    from smpo.data.sources import HubSource

    stream = HubSource(str(pickapic_parquet.parent), split="train")
    assert stream.num_rows is None and stream.columns == ParquetSource(pickapic_parquet).columns
    stats = ReadStats()
    assert [p.pair_id for p in iter_pairs(stream, stats=stats)] == [p.pair_id for p in iter_pairs(pickapic_parquet)]
    assert (stats.rows, stats.pairs, stats.ties, len(stats.skipped)) == (12, 10, 1, 1)
    assert pa.concat_tables(stream.batches(3, 6)).column("ranking_id").to_pylist() == [1003, 1004, 1005]
    assert [t.num_rows for _, _, t in iter_shards(stream, 5)] == [5, 5, 2] and stream.num_rows == 12
