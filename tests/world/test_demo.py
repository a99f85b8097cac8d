"""`smpo demo --quick` end to end (the one slow test of the world: about a minute on 2 cores)."""

import json
import re
import shutil

import pandas as pd
import pytest
from PIL import Image

from smpo.cli import main
from smpo.world.demo import QUICK
from smpo.world.demo_report import GRID_HEADER
from smpo.world.pairset import pair_set_path


def test_demo_quick_writes_report_plot_and_grid(tmp_path, cli_error):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out), "--seed", "0"]) == 0
    report = json.loads((out / "report.json").read_text())
    # Pairs: the shipped Pick-a-Pic-schema set (renders and base samples), labelled by the world reward model.
    pairs = pd.read_parquet(pair_set_path() / "train-00000-of-00001.parquet")
    assert set(pairs.label_0) <= {0.0, 0.5, 1.0} and set(pairs.model_0) == {"render", "world-base"}
    assert report["labels"]["pairs"] == len(pairs) == 2048 and not (out / "pairs").exists()
    labelled = json.loads((out / "labelled" / "labels.json").read_text())
    assert labelled["scorer"] == "world"
    # Both methods trained through smpo.train, checkpoints every eval_every steps.
    for method in ("smpo", "dpo"):
        assert (out / "runs" / method / "final" / "unet" / "config.json").is_file()
    steps = {name: sorted(int(s) for s in curve) for name, curve in report["reward_vs_step"].items()}
    assert steps == {"SmPO": [0, 2, 4], "Diffusion-DPO": [0, 2, 4]}
    # The report: medians of three models on the same held-out images, win rates both ways.
    assert set(report["median_reward"]) == {"SmPO", "Diffusion-DPO", "base"}
    base_scores = pd.read_parquet(out / "eval" / "base" / "evaluation" / "scores.parquet")
    assert len(base_scores) == QUICK.eval_prompts * QUICK.images_per_prompt
    assert report["median_reward"]["base"] == pytest.approx(base_scores["world"].median())
    assert report["reward_vs_step"]["SmPO"]["0"] == pytest.approx(base_scores["world"].median())
    rates = pd.DataFrame(report["win_rates"])
    assert len(rates) == 3 and rates.win_rate.between(0, 1).all()
    text = (out / "report.md").read_text()
    assert "| SmPO |" in text and "win rate vs base" in text
    assert "beside the multi-seed study" in text and report["learning_rates"].keys() == {"smpo", "dpo"}
    assert (out / "compare" / "table.md").is_file()
    # The plot and the grid are real images: grid rows base, SmPO, DPO of 8 images (32 px x3).
    assert Image.open(out / "reward_vs_step.png").size[0] > 300
    assert Image.open(out / "grid.png").size == (110 + 8 * 96, GRID_HEADER + 3 * 96)  # prompts on top
    assert "pass --overwrite" in cli_error(["demo", "--quick", "--output", str(out)])
    # A demo stopped during DPO's training resumes: the pairs, labels, base and SmPO are kept,
    # DPO continues from its step-2 checkpoint, and the report comes out the same.
    first = report
    for gone in ("runs/dpo/checkpoints/step-000004", "runs/dpo/final", "unets/dpo/step-000004",
                 "eval/dpo-step-000004", "report.json", "report.md"):
        path = out / gone
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    kept = [out / "eval" / "smpo-step-000004" / "images" / "00000_00.png", out / "runs" / "smpo" / "metrics.jsonl",
            out / "labelled" / "labels.json"]
    stamps = [path.stat().st_mtime_ns for path in kept]
    assert main(["demo", "--quick", "--output", str(out), "--seed", "0", "--resume"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert [path.stat().st_mtime_ns for path in kept] == stamps  # not made again
    assert (out / "runs" / "dpo" / "final" / "unet" / "config.json").is_file()
    for name, curve in first["reward_vs_step"].items():
        assert again["reward_vs_step"][name] == pytest.approx(curve, abs=1e-3), name
    assert again["median_reward"] == pytest.approx(first["median_reward"], abs=1e-3)
    assert re.search("made with other settings .*seed: 0 -> 1",
                     cli_error(["demo", "--quick", "--output", str(out), "--seed", "1", "--resume"]))
