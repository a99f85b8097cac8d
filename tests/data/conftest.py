"""Fixtures for the data tests: a small Pick-a-Pic-schema set and a tiny PickScore-architecture scorer."""

from __future__ import annotations

from pathlib import Path

import pytest
from pickapic_testdata import pickapic_rows, write_parquet


@pytest.fixture
def rows() -> list[dict]:
    return pickapic_rows()


@pytest.fixture
def pickapic_parquet(tmp_path: Path, rows: list[dict]) -> Path:
    """A dozen pairs, one corrupt JPEG (row 4) and one human tie (row 7), in row groups of 5."""
    return write_parquet(tmp_path / "pickapic" / "train-00000-of-00001.parquet", rows, row_group_size=5)


@pytest.fixture(scope="session")
def tiny_pickscore(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random PickScore-architecture model (transformers CLIPModel + tokenizer) saved locally."""
    from smpo.rewards.testing import save_tiny_scorer

    return save_tiny_scorer("pickscore", tmp_path_factory.mktemp("tiny_pickscore"))
