"""Tiny models shared by the evaluation tests: SD1.5 / SDXL pipelines (16 px) and the five scorers."""

from __future__ import annotations

import pytest

from smpo.evaluation.evaluate import PAPER_SCORERS


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory):
    """``{"sd15": folder, "sdxl": folder}``: random tiny pipelines saved like user checkpoints."""
    from smpo.models.presets import save_pipeline

    root = tmp_path_factory.mktemp("pipelines")
    return {family: save_pipeline(root / family, family, "tiny") for family in ("sd15", "sdxl")}


@pytest.fixture(scope="session")
def tiny_scorers(tmp_path_factory):
    """``{name: folder}`` for the paper's five scorers, tiny random weights in each scorer's format."""
    from smpo.rewards.testing import save_tiny_scorer

    root = tmp_path_factory.mktemp("scorers")
    return {name: save_tiny_scorer(name, root / name.replace(".", "_")) for name in PAPER_SCORERS}


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red cube\na blue ball on grass\n\n\"quoted\" sky at night\n", encoding="utf-8")
    return path
