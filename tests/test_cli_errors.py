"""One error convention for every command (issue 13): an expected failure prints one line
``smpo COMMAND: error: ...`` naming the file, row or option, exits with status 2, and leaves no
output behind; ``--debug`` (or ``SMPO_DEBUG=1``) shows the traceback instead."""

import json

import pandas as pd
import pytest

from smpo.cli import main
from smpo.io import looks_local
from smpo.world.model import base_path
from smpo.world.pairset import pair_set_path

BASE = str(base_path())


@pytest.fixture
def raw_pairs(tmp_path):
    """A raw (unlabelled) Pick-a-Pic-schema folder: 16 pairs of the world's shipped set."""
    folder = tmp_path / "raw"
    folder.mkdir()
    pd.read_parquet(pair_set_path() / "train-00000-of-00001.parquet").head(16).to_parquet(
        folder / "train-00000-of-00001.parquet")
    return folder


def test_missing_local_folders_are_named_and_never_sent_to_the_hub(tmp_path, cli_error, raw_pairs):
    out = tmp_path / "out"
    line = cli_error(["train", "--dataset", str(tmp_path / "missing"), "--model", BASE, "--output", str(out),
                      "--max-steps", "1"])
    assert str(tmp_path / "missing") in line and "smpo label" in line
    line = cli_error(["train", "--dataset", str(raw_pairs), "--model", "/missing/folder", "--output", str(out)])
    assert "--model /missing/folder: no such folder" in line
    line = cli_error(["generate", "--model", BASE, "--unet", "./missing/unet", "--prompts", "parti",
                      "--output", str(out)])
    assert "--unet ./missing/unet: no such folder" in line
    line = cli_error(["cache", str(raw_pairs), "--model", "../nowhere/sd15", "--output", str(out)])
    assert "--model ../nowhere/sd15: no such folder" in line
    assert not out.exists()
    assert looks_local("/abs/path") and looks_local("./rel") and looks_local("a/b/c")
    assert not looks_local("stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_bad_rows_unknown_values_and_unlabelled_data(tmp_path, cli_error, raw_pairs):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "image_0": "x.png", "image_1": "y.png", "label_0": 1}) + "\n{oops\n")
    line = cli_error(["label", str(bad), str(tmp_path / "l1"), "--scorer", "world"])
    assert "pairs.jsonl" in line and "line 2" in line
    no_caption = tmp_path / "no_caption"
    no_caption.mkdir()
    pd.read_parquet(raw_pairs / "train-00000-of-00001.parquet").drop(columns=["caption"]).to_parquet(
        no_caption / "train-00000-of-00001.parquet")
    line = cli_error(["label", str(no_caption), str(tmp_path / "l3"), "--scorer", "world"])
    assert "caption" in line and "no_caption" in line
    line = cli_error(["label", str(raw_pairs), str(tmp_path / "l2"), "--scorer", "bogus"])
    assert "unknown scorer 'bogus'" in line and "pickscore" in line
    line = cli_error(["train", "--method", "smpo", "--dataset", str(raw_pairs), "--model", BASE,
                      "--output", str(tmp_path / "t"), "--max-steps", "1", "--batch-size", "2",
                      "--gradient-accumulation-steps", "1", "--no-progress"])
    assert "p_win" in line and "smpo label" in line
    line = cli_error(["evaluate", str(raw_pairs)])
    assert "smpo generate" in line
    line = cli_error(["demo", "--quick", "--methods", "smpo,ppo", "--output", str(tmp_path / "d")])
    assert "--methods: unknown ['ppo']" in line
    for name in ("l1", "l2", "l3", "t", "d"):
        assert not (tmp_path / name).exists(), name


def test_existing_output_is_refused_and_kept(tmp_path, cli_error):
    out = tmp_path / "pairs"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "pass --overwrite" in cli_error(["world", "pairs", "--output", str(out), "--pairs", "2"])
    assert (out / "keep.txt").read_text() == "mine"


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        main(["train", "--dataset", "x", "--model", "/missing/folder", "--output", str(tmp_path / "o"), "--debug"])
    monkeypatch.setenv("SMPO_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="no parquet file"):
        main(["label", str(tmp_path), str(tmp_path / "o2"), "--scorer", "world"])
