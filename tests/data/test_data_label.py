"""`smpo label`: smoothed labels (ALGORITHM.md section 2, Eq. 11), counts, resumption, refusal."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from pickapic_testdata import CORRUPT_ROW, TIE_ROW
from PIL import Image

import smpo.data.label as label_module
import smpo.data.scoring as scoring_module
from smpo.cli import main
from smpo.data.label import load_labelled
from smpo.io import OutputExistsError, prepare_job_output
from smpo.rewards import load_scorer

EXPECTED_COLUMNS = ["pair_id", "caption", "jpg_0", "jpg_1", "label_0", "score_0", "score_1", "winner", "p_win",
                    "ranking_id", "user_id", "label_1", "model_0", "model_1"]


def label(source: Path, output: Path, scorer: Path, *extra: str) -> int:
    return main(["label", str(source), str(output), "--scorer-path", str(scorer), "--shard-size", "4",
                 "--batch-size", "3", "--no-progress", *extra])


def read_output(folder: Path) -> tuple[list[dict], dict]:
    metadata = json.loads((folder / "labels.json").read_text())
    rows = [row for name in metadata["shards"] for row in pq.read_table(folder / name).to_pylist()]
    return rows, metadata


def by_hand_p_win(score_w: float, score_l: float, lo: float, hi: float) -> float:
    """Eq. 11 spelled out: p_w = exp(s~_w) / (exp(s~_w) + exp(s~_l)), s~ = (s - min) / (max - min)."""
    norm_w, norm_l = (score_w - lo) / (hi - lo), (score_l - lo) / (hi - lo)
    return math.exp(norm_w) / (math.exp(norm_w) + math.exp(norm_l))


def test_label_writes_p_win_per_eq_11_and_counts_skipped_and_tied_pairs(pickapic_parquet, tiny_pickscore,
                                                                      tmp_path, rows, capsys):
    out = tmp_path / "labelled"
    assert label(pickapic_parquet, out, tiny_pickscore) == 0
    written, metadata = read_output(out)

    # 12 rows: row 4 has a corrupt JPEG (skipped, named), row 7 is a human tie (dropped by default)
    assert sorted(p.name for p in out.iterdir()) == ["labels.json", "train-00000-of-00003.parquet",
                                                     "train-00001-of-00003.parquet", "train-00002-of-00003.parquet"]
    assert [r["pair_id"] for r in written] == [str(1000 + i) for i in range(12) if i not in (CORRUPT_ROW, TIE_ROW)]
    assert metadata["counts"] == {"rows": 12, "pairs": 10, "ties": 1, "skipped": 1}
    [skipped] = metadata["skipped"]
    assert (skipped["pair_id"], skipped["row"]) == ("1004", CORRUPT_ROW) and "jpg_1" in skipped["reason"]
    assert metadata["columns"] == EXPECTED_COLUMNS and metadata["scorer"] == "pickscore"

    # the scores are the scorer's, for the right image with the right caption
    scorer = load_scorer("pickscore", tiny_pickscore, device="cpu")
    first = rows[0]
    direct = scorer([Image.open(__import__("io").BytesIO(first["jpg_0"])).convert("RGB"),
                     Image.open(__import__("io").BytesIO(first["jpg_1"])).convert("RGB")], [first["caption"]] * 2)
    assert (written[0]["score_0"], written[0]["score_1"]) == pytest.approx(direct.tolist(), abs=1e-5)
    assert written[0]["jpg_0"] == first["jpg_0"] and written[0]["user_id"] == 0

    # p_win recomputed by hand from the written scores and the range over all of them
    scores = [s for r in written for s in (r["score_0"], r["score_1"])]
    lo, hi = min(scores), max(scores)
    assert (metadata["score_min"], metadata["score_max"]) == (lo, hi) and metadata["score_range_from"] == "data"
    for r in written:
        assert r["winner"] == (1 if r["score_1"] > r["score_0"] else 0)
        expected = by_hand_p_win(max(r["score_0"], r["score_1"]), min(r["score_0"], r["score_1"]), lo, hi)
        assert r["p_win"] == pytest.approx(expected, rel=0, abs=1e-12)
        assert 0.5 <= r["p_win"] <= 1 / (1 + math.exp(-1))
    p_wins = [r["p_win"] for r in written]
    assert metadata["p_win_quantiles"]["0.5"] == pytest.approx(statistics.median(p_wins), abs=1e-15)
    assert metadata["p_win_quantiles"]["0"] == min(p_wins) and metadata["p_win_quantiles"]["1"] == max(p_wins)
    agree = [r["winner"] == (0 if r["label_0"] == 1.0 else 1) for r in written]
    assert metadata["agreement"] == pytest.approx(sum(agree) / len(agree)) and metadata["agreement_pairs"] == 10

    printed = capsys.readouterr().out
    assert "labelled 10 pairs from 12 rows" in printed and "skipped: 1; 1 human ties dropped" in printed
    assert "skipped pair 1004 (row 4): cannot decode jpg_1" in printed and "reward model agrees" in printed

    dataset = load_labelled(out)  # loads as a datasets.Dataset
    assert dataset.num_rows == 10 and dataset.column_names == EXPECTED_COLUMNS


def test_score_range_override_and_keep_ties(pickapic_parquet, tiny_pickscore, tmp_path):
    out = tmp_path / "labelled"
    assert label(pickapic_parquet, out, tiny_pickscore, "--keep-ties", "--score-min", "-40", "--score-max", "10") == 0
    written, metadata = read_output(out)
    assert len(written) == 11 and [r["label_0"] for r in written].count(0.5) == 1
    assert (metadata["score_min"], metadata["score_max"], metadata["score_range_from"]) == (-40.0, 10.0, "override")
    for r in written:
        expected = by_hand_p_win(max(r["score_0"], r["score_1"]), min(r["score_0"], r["score_1"]), -40.0, 10.0)
        assert r["p_win"] == pytest.approx(expected, rel=0, abs=1e-12)
    assert metadata["agreement_pairs"] == 10  # the tie has no human winner


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".parquet"}


def _labels_without_output(folder: Path) -> dict:
    metadata = json.loads((folder / "labels.json").read_text())
    metadata.pop("output")
    return metadata


def test_run_killed_while_scoring_then_rerun_equals_uninterrupted_run(pickapic_parquet, tiny_pickscore, tmp_path,
                                                                      monkeypatch):
    reference = tmp_path / "reference"
    assert label(pickapic_parquet, reference, tiny_pickscore) == 0

    out = tmp_path / "killed"
    real_write = scoring_module._write_work_shard
    written: list[str] = []

    def dies_in_second_shard(folder, scored, stats):
        if written:  # the second shard: leave a half-written file behind, as a SIGKILL would, and die
            half = folder.parent / f".{folder.name}.killed.tmp" / folder.name
            half.mkdir(parents=True)
            (half / "scored.parquet").write_bytes(b"PAR1 half")
            raise KeyboardInterrupt("killed")
        written.append(folder.name)
        real_write(folder, scored, stats)

    monkeypatch.setattr(scoring_module, "_write_work_shard", dies_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        label(pickapic_parquet, out, tiny_pickscore)
    assert not (out / "labels.json").exists() and not list(out.glob("*.parquet"))
    assert sorted(p.name for p in (out / ".work").iterdir() if not p.name.startswith(".")) == [
        "run.json", "shard-00000"]

    resumed: list[str] = []
    monkeypatch.setattr(scoring_module, "_write_work_shard",
                        lambda folder, scored, stats: (resumed.append(folder.name), real_write(folder, scored, stats)))
    assert label(pickapic_parquet, out, tiny_pickscore) == 0
    assert resumed == ["shard-00001", "shard-00002"]  # the finished shard was kept, not rescored
    assert _shard_bytes(out) == _shard_bytes(reference) and len(_shard_bytes(out)) == 3
    assert _labels_without_output(out) == _labels_without_output(reference)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


def test_run_killed_while_finalising_then_rerun_equals_uninterrupted_run(pickapic_parquet, tiny_pickscore,
                                                                         tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference"
    assert label(pickapic_parquet, reference, tiny_pickscore) == 0

    out = tmp_path / "killed"
    real_write = label_module._write_final_shard
    calls: list[str] = []

    def dies_on_second_final_shard(path, table):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_write(path, table)

    monkeypatch.setattr(label_module, "_write_final_shard", dies_on_second_final_shard)
    with pytest.raises(KeyboardInterrupt):
        label(pickapic_parquet, out, tiny_pickscore)
    assert [p.name for p in out.glob("*.parquet")] == ["train-00000-of-00003.parquet"]
    assert not (out / "labels.json").exists() and (out / ".work" / "finalise.json").exists()

    monkeypatch.setattr(label_module, "_write_final_shard", real_write)
    assert label(pickapic_parquet, out, tiny_pickscore, "--score-min", "-50") == 2  # the range is fixed already
    assert "began with --score-min/--score-max {'score_max': None, 'score_min': None}" in capsys.readouterr().err
    assert label(pickapic_parquet, out, tiny_pickscore) == 0
    assert _shard_bytes(out) == _shard_bytes(reference)
    assert _labels_without_output(out) == _labels_without_output(reference)
    assert not (out / ".work").exists()


def test_existing_output_is_refused_without_overwrite(pickapic_parquet, tiny_pickscore, tmp_path, capsys):
    out = tmp_path / "labelled"
    assert label(pickapic_parquet, out, tiny_pickscore, "--limit", "6") == 0
    before = _shard_bytes(out)
    assert label(pickapic_parquet, out, tiny_pickscore, "--limit", "6") == 2
    assert "already holds a finished labelled dataset; pass --overwrite" in capsys.readouterr().err
    assert _shard_bytes(out) == before

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="is not an unfinished `smpo label` run"):
        label_module.label_pairs(pickapic_parquet, other, scorer_path=tiny_pickscore, progress=False)

    assert label(pickapic_parquet, out, tiny_pickscore, "--overwrite") == 0
    assert json.loads((out / "labels.json").read_text())["counts"]["rows"] == 12


def test_unfinished_run_with_other_settings_is_refused(pickapic_parquet, tiny_pickscore, tmp_path, monkeypatch):
    out = tmp_path / "labelled"

    def dies(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(scoring_module, "_write_work_shard", dies)
    with pytest.raises(KeyboardInterrupt):
        label(pickapic_parquet, out, tiny_pickscore)
    with pytest.raises(OutputExistsError, match=r"shard_size: 4 -> 6"):
        label_module.label_pairs(pickapic_parquet, out, scorer_path=tiny_pickscore, shard_size=6, batch_size=3,
                                 progress=False)


def test_a_scorer_callable_can_be_passed_directly(pickapic_parquet, tmp_path):
    def brightness(images, prompts):  # a stand-in reward: mean pixel value
        return torch.tensor([float(sum(im.convert("L").getdata())) / (im.width * im.height) for im in images])

    summary = label_module.label_pairs(pickapic_parquet, tmp_path / "out", scorer=brightness, shard_size=5,
                                       progress=False)
    assert summary.scorer == "brightness" and summary.pairs == 10 and len(summary.shards) == 3
    written, _ = read_output(tmp_path / "out")
    row = written[0]
    assert row["score_0"] == pytest.approx(brightness([Image.open(__import__("io").BytesIO(row["jpg_0"]))], [""]).item())


@pytest.mark.parametrize("seed", [21, 2], ids=["a-shard", "its-settings"])  # the kill points they draw
def test_process_killed_by_sigkill_then_rerun_equals_uninterrupted_run(seed, pickapic_parquet, tiny_pickscore,
                                                                       tmp_path):
    from kill_helpers import assert_no_partial_file, kill_point, leftovers, run_killed, visible_files

    reference = tmp_path / "reference"
    assert label(pickapic_parquet, reference, tiny_pickscore) == 0
    out = tmp_path / "killed"
    # the atomic writes: .work/run.json, 3 work shards (each: stats.json inside, the shard), .work/source.json,
    # .work/finalise.json, the 3 final shards, labels.json
    at = kill_point(13, seed=seed)
    run_killed(["label", str(pickapic_parquet), str(out), "--scorer-path", str(tiny_pickscore), "--shard-size", "4",
                "--batch-size", "3", "--no-progress"], at=at)
    assert_no_partial_file(out, reference, skip=("labels.json",))  # it names its folder
    assert not (out / "labels.json").exists()

    assert label(pickapic_parquet, out, tiny_pickscore) == 0
    assert visible_files(out, skip=("labels.json",)) == visible_files(reference, skip=("labels.json",)), at
    assert _labels_without_output(out) == _labels_without_output(reference)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert leftovers(out) == [], at


def test_processes_take_shards_i_mod_world_and_together_equal_one_process(pickapic_parquet, tiny_pickscore,
                                                                          tmp_path):
    reference = tmp_path / "reference"
    assert label(pickapic_parquet, reference, tiny_pickscore) == 0

    out = tmp_path / "two"
    settings = label_module.RunSettings(source=str(pickapic_parquet), split="train", scorer="pickscore",
                                        scorer_path=str(tiny_pickscore), shard_size=4, batch_size=3,
                                        keep_ties=False, limit=None, dtype="float32")
    prepare_job_output(out, asdict(settings), job="smpo label", finished="labels.json",
                       kind="labelled dataset")
    source = label_module.open_source(pickapic_parquet)
    scorer = load_scorer("pickscore", tiny_pickscore, device="cpu", batch_size=6)
    work = out / ".work"
    label_module.score_shards(source, work, scorer, settings, rank=1, world=2, progress=False)
    assert sorted(p.name for p in work.glob("shard-*")) == ["shard-00001"]
    label_module.score_shards(source, work, scorer, settings, rank=0, world=2, progress=False)
    assert sorted(p.name for p in work.glob("shard-*")) == ["shard-00000", "shard-00001", "shard-00002"]
    label_module.finalise(out)
    assert _shard_bytes(out) == _shard_bytes(reference)


def test_labelling_a_stream_equals_labelling_the_file(pickapic_parquet, tiny_pickscore, tmp_path):
    from smpo.data.sources import HubSource

    reference = tmp_path / "reference"
    assert label(pickapic_parquet, reference, tiny_pickscore) == 0
    stream = HubSource(str(pickapic_parquet.parent), split="train")  # length unknown until the pass ends
    summary = label_module.label_pairs(stream, tmp_path / "streamed", scorer_path=tiny_pickscore, shard_size=4,
                                       batch_size=3, progress=False)
    assert summary.rows == 12 and summary.pairs == 10
    assert _shard_bytes(tmp_path / "streamed") == _shard_bytes(reference)


def test_nothing_to_label_is_a_clear_error(tmp_path, tiny_pickscore, capsys):
    from pickapic_testdata import CORRUPT_BYTES, pickapic_rows, write_parquet

    rows = pickapic_rows(3, corrupt_row=None, tie_row=None)
    for row in rows:
        row["jpg_0"] = CORRUPT_BYTES
    source = write_parquet(tmp_path / "bad.parquet", rows)
    assert label(source, tmp_path / "out", tiny_pickscore) == 2
    assert "nothing to label: all 3 rows of" in capsys.readouterr().err


def test_labelling_own_jsonl_pairs_keeps_their_paths(tmp_path):
    from pickapic_testdata import random_jpeg

    lines = []
    for i in range(3):
        for side in (0, 1):
            (tmp_path / f"{i}_{side}.jpg").write_bytes(random_jpeg(i * 2 + side))
        lines.append(json.dumps({"prompt": f"p{i}", "image_0": f"{i}_0.jpg", "image_1": f"{i}_1.jpg", "label_0": 1}))
    (tmp_path / "mine.jsonl").write_text("\n".join(lines) + "\n")

    def first_pixel(images, prompts):
        return torch.tensor([float(im.getpixel((0, 0))[0]) for im in images])

    summary = label_module.label_pairs(tmp_path / "mine.jsonl", tmp_path / "out", scorer=first_pixel, progress=False)
    written, metadata = read_output(tmp_path / "out")
    assert summary.pairs == 3 and [r["image_1"] for r in written] == ["0_1.jpg", "1_1.jpg", "2_1.jpg"]
    assert written[2]["jpg_0"] == (tmp_path / "2_0.jpg").read_bytes() and written[2]["caption"] == "p2"
    assert metadata["columns"][-2:] == ["image_0", "image_1"]
