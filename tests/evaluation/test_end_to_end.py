"""generate -> evaluate -> compare on the CPU with tiny SD1.5 / SDXL models and the five tiny scorers."""

import pandas as pd
from PIL import Image

from smpo.cli import main
from smpo.evaluation.evaluate import PAPER_SCORERS
from smpo.evaluation.manifest import read_manifest
from smpo.evaluation.report import label
from smpo.prompts import load_prompts

from .test_evaluate_compare import read_page


def test_generate_evaluate_compare_end_to_end(tiny_pipelines, tiny_scorers, tmp_path):
    prompts = ["--prompts", "parti", "--categories", "Animals", "--limit", "3", "--steps", "2"]
    runs = {"sd15": ["--model", str(tiny_pipelines["sd15"])],
            "sdxl": ["--model", str(tiny_pipelines["sdxl"])],
            "sd15-cfg1": ["--model", str(tiny_pipelines["sd15"]), "--cfg", "1"]}
    for name, model in runs.items():
        assert main(["generate", *model, *prompts, "--out", str(tmp_path / name), "--batch-size", "2"]) == 0
    records = read_manifest(tmp_path / "sd15")
    animals = [p for p in load_prompts("parti") if p.category == "Animals"][:3]
    assert [(r.prompt_index, r.prompt, r.category, r.seed) for r in records] == [
        (p.index, p.text, "Animals", 0) for p in animals]

    paths = [f"--scorer-path={name}={folder}" for name, folder in tiny_scorers.items()]
    for name in runs:
        assert main(["evaluate", str(tmp_path / name), *paths, "--num-resamples", "100"]) == 0
    scores = pd.read_parquet(tmp_path / "sd15" / "evaluation" / "scores.parquet")
    assert len(scores) == 3 and scores[list(PAPER_SCORERS)].notna().all().all()
    summary = pd.read_csv(tmp_path / "sd15" / "evaluation" / "summary.csv").set_index("scorer")
    assert list(summary.index) == list(PAPER_SCORERS)
    for scorer in PAPER_SCORERS:
        assert summary.loc[scorer, "median"] == scores[scorer].median()

    report = tmp_path / "report"
    assert main(["compare", *(str(tmp_path / n) for n in runs), "--out", str(report), "--num-resamples", "100"]) == 0
    table = pd.read_csv(report / "table.csv").set_index("model")
    assert list(table.index) == list(runs)
    winrates = pd.read_csv(report / "winrates.csv")
    assert len(winrates) == 3 * len(PAPER_SCORERS)  # 3 pairs of models x 5 scorers
    assert winrates["win_rate"].between(0, 1).all()

    with Image.open(report / "report.png") as plot:
        plot.load()
        assert plot.info["Description"] == "scorers: " + ", ".join(PAPER_SCORERS)
    page = read_page(report / "report.html")
    header = page.tables["table2"]
    for scorer in PAPER_SCORERS:
        assert label(scorer) in header
        assert label(scorer) in (report / "table.md").read_text()
    assert page.tables["samples"] == ["prompt", *runs]
    assert sum(src.startswith("data:image/png") for src in page.images) == 3 * 3  # 3 prompts x 3 models
