import os

# Tests never touch a hub: every model is built tiny and saved locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread, here and in every subprocess a test starts: equivalence tests compare runs split over
# processes bit for bit, and a different thread count changes the order of float reductions.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


import pytest  # noqa: E402


@pytest.fixture
def cli_error(capsys):
    """Run ``smpo ARGV`` expecting the one-line error convention: exit status 2, one stderr line
    ``smpo COMMAND: error: ...`` and no traceback. Returns that line."""
    from smpo.cli import main

    def run(argv: list[str]) -> str:
        capsys.readouterr()
        assert main(argv) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in lines[0], lines
        assert lines[0].startswith(f"smpo {argv[0]}: error: "), lines[0]
        return lines[0]

    return run
