"""`smpo label` launched as two processes (torchrun, no CUDA): each takes its own shards and the
output is the bytes of a one-process run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from smpo.cli import main


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".parquet"}


def test_two_torchrun_processes_split_the_shards_and_write_the_one_process_bytes(pickapic_parquet, tiny_pickscore,
                                                                                 tmp_path):
    options = ["--scorer-path", str(tiny_pickscore), "--shard-size", "4", "--batch-size", "3", "--no-progress"]
    one = tmp_path / "one"
    assert main(["label", str(pickapic_parquet), str(one), *options]) == 0

    two = tmp_path / "two"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    # Each process logs the shards it scored: neither may take the other's.
    code = ("import sys, smpo.data.scoring as s; real = s._write_work_shard\n"
            "def logged(folder, scored, stats):\n"
            "    print('scored', folder.name, flush=True); real(folder, scored, stats)\n"
            "s._write_work_shard = logged\n"
            "from smpo.cli import main; sys.exit(main(sys.argv[1:]))\n")
    script = tmp_path / "label_logged.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29517", "--tee", "3", str(script), "label", str(pickapic_parquet),
                             str(two), *options], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scored = [line.split("]:")[-1].strip() for line in result.stdout.splitlines() if "scored shard-" in line]
    ranks = {line.split("]:")[0].strip("[ ") for line in result.stdout.splitlines() if "scored shard-" in line}
    assert sorted(scored) == ["scored shard-00000", "scored shard-00001", "scored shard-00002"], result.stdout
    assert len(ranks) == 2, result.stdout  # both processes scored
    assert _shard_bytes(two) == _shard_bytes(one)
