"""`smpo evaluate` launched as two processes (torchrun, no CUDA), or killed with SIGKILL and rerun:
the output is the bytes of a one-process, uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from smpo.cli import main
from smpo.evaluation.manifest import ImageRecord, image_file, write_manifest


def _generated(folder: Path) -> Path:
    """Seven plain images and their manifest, as `smpo generate` lays them out."""
    records = []
    for i in range(7):
        path = folder / image_file(i, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (30 * i, 255 - 30 * i, 7 * i)).save(path)
        records.append(ImageRecord(image_file(i, 0), i, 0, 0, f"prompt {i}"))
    write_manifest(folder, records)
    return folder


def test_two_torchrun_processes_score_their_own_pieces_and_match_one_process(tmp_path):
    from smpo.rewards.testing import save_tiny_scorer

    scorer = save_tiny_scorer("pickscore", tmp_path / "pickscore")
    folder = _generated(tmp_path / "generated")
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


def test_killed_by_sigkill_mid_write_then_rerun_writes_the_bytes_of_an_uninterrupted_run(tmp_path):
    from kill_helpers import assert_no_partial_file, kill_point, leftovers, run_killed, visible_files
    from smpo.rewards.testing import save_tiny_scorer

    folder = _generated(tmp_path / "generated")
    paths = {name: save_tiny_scorer(name, tmp_path / name) for name in ("pickscore", "aesthetic")}
    options = ["evaluate", str(folder), "--scorers", *paths, *(f"--scorer-path={k}={v}" for k, v in paths.items()),
               "--chunk-size", "2", "--num-resamples", "50"]
    reference, out = tmp_path / "reference", tmp_path / "killed"
    assert main([*options, "--output", str(reference)]) == 0
    # the atomic writes, per scorer: pieces 0-3, evaluation.json; then the four tables
    at = kill_point(14, seed=13)  # evaluation.json after the first scorer
    run_killed([*options, "--output", str(out)], at=at)
    assert_no_partial_file(out, reference, skip=("evaluation.json",))  # between scorers: the second has no scale yet
    assert main([*options, "--output", str(out)]) == 0
    assert visible_files(out) == visible_files(reference), at
    assert leftovers(out) == [], at
