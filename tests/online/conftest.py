from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_pickscore(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random PickScore-architecture model saved locally."""
    from smpo.rewards.testing import save_tiny_scorer

    return save_tiny_scorer("pickscore", tmp_path_factory.mktemp("tiny_pickscore"))
