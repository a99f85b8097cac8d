"""`smpo evaluate` launched as two processes (torchrun, no CUDA): each scores its own pieces and the
output is the bytes of a one-process run."""

from __future__ import annotations

import os
import subprocess
import sys

from PIL import Image

from smpo.cli import main
from smpo.evaluation.manifest import ImageRecord, image_file, write_manifest


def test_two_torchrun_processes_score_their_own_pieces_and_match_one_process(tmp_path):
    from smpo.rewards.testing import save_tiny_scorer

    scorer = save_tiny_scorer("pickscore", tmp_path / "pickscore")
    folder = tmp_path / "generated"
    records = []
    for i in range(7):
        path = folder / image_file(i, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (30 * i, 255 - 30 * i, 7 * i)).save(path)
        records.append(ImageRecord(image_file(i, 0), i, 0, 0, f"prompt {i}"))
    write_manifest(folder, records)
    options = ["--scorers", "pickscore", "--scorer-path", f"pickscore={scorer}", "--chunk-size", "2",
               "--num-resamples", "50"]
    assert main(["evaluate", str(folder), *options, "--output", str(tmp_path / "one")]) == 0

    script = tmp_path / "evaluate_logged.py"  # each process logs the pieces it writes
    script.write_text("import sys, smpo.evaluation.evaluate as e; real = e.atomic_path\n"
                      "def logged(path):\n"
                      "    print('writes', path.name, flush=True); return real(path)\n"
                      "e.atomic_path = logged\n"
                      "from smpo.cli import main; sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29520", "--tee", "3", str(script), "evaluate", str(folder), *options, "--output",
                             str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    pieces: dict[str, set[str]] = {}
    for line in result.stdout.splitlines():
        if "writes part-" in line:
            rank, _, rest = line.partition("]:")
            pieces.setdefault(rank.strip("[ "), set()).add(rest.split()[-1])
    assert sorted(map(sorted, pieces.values())) == [["part-00000.parquet", "part-00002.parquet"],
                                                    ["part-00001.parquet", "part-00003.parquet"]], result.stdout
    for name in ("scores.parquet", "scores.csv", "summary.csv", "summary.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
