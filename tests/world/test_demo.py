"""`smpo demo --quick` end to end (the one slow test of the world: about a minute on 2 cores)."""

import json

import pandas as pd
import pytest
from PIL import Image

from smpo.cli import main
from smpo.io import OutputExistsError
from smpo.world.demo import QUICK


def test_demo_quick_writes_report_plot_and_grid(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out), "--seed", "0"]) == 0
    report = json.loads((out / "report.json").read_text())
    # Pairs: Pick-a-Pic schema from the base, labelled by the world reward model.
    pairs = pd.read_parquet(out / "pairs" / "train-00000-of-00001.parquet")
    assert len(pairs) == QUICK.pairs and set(pairs.label_0) <= {0.0, 0.5, 1.0}
    assert report["labels"]["pairs"] == QUICK.pairs
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
    assert len(base_scores) == QUICK.eval_prompts
    assert report["median_reward"]["base"] == pytest.approx(base_scores["world"].median())
    assert report["reward_vs_step"]["SmPO"]["0"] == pytest.approx(base_scores["world"].median())
    rates = pd.DataFrame(report["win_rates"])
    assert len(rates) == 3 and rates.win_rate.between(0, 1).all()
    text = (out / "report.md").read_text()
    assert "| SmPO |" in text and "win rate vs base" in text
    assert (out / "compare" / "table.md").is_file()
    # The plot and the grid are real images: grid rows base, SmPO, DPO of 8 images (32 px x3).
    assert Image.open(out / "reward_vs_step.png").size[0] > 300
    assert Image.open(out / "grid.png").size == (110 + 8 * 96, 3 * 96)
    with pytest.raises(OutputExistsError):
        main(["demo", "--quick", "--output", str(out)])
