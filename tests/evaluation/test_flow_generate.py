"""`smpo generate` with tiny SD3 and FLUX pipelines: the base model, a trained full transformer and a
trained LoRA (from `smpo train`), through StableDiffusion3Pipeline / FluxPipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from smpo.cli import main
from smpo.evaluation.manifest import read_manifest
from smpo.evaluation.pipelines import detect_family, load_pipeline, trained_output_kind
from smpo.models.presets import save_pipeline


@pytest.fixture(scope="module")
def flow_pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-pipelines")
    return {family: save_pipeline(root / family, family, "tiny") for family in ("sd3", "flux")}


def _pixels(folder) -> dict[str, np.ndarray]:
    return {r.file: np.asarray(Image.open(folder / r.file)) for r in read_manifest(folder)}


def _labelled(tmp_path):
    """The training tests' small labelled dataset (tests/train/conftest.py's writer)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("train_conftest", Path(__file__).resolve().parents[1] / "train" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_labelled_dataset(tmp_path / "data", 2)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_generate_base_full_and_lora(family, flow_pipelines, prompt_file, tmp_path):
    model = flow_pipelines[family]
    assert detect_family(model) == family
    gen = ["--prompts", str(prompt_file), "--steps", "2", "--images-per-prompt", "1"]
    assert main(["generate", "--model", str(model), "--out", str(tmp_path / "base"), *gen, "--batch-size", "1"]) == 0
    assert main(["generate", "--model", str(model), "--out", str(tmp_path / "b3"), *gen, "--batch-size", "3"]) == 0
    base = _pixels(tmp_path / "base")
    assert len(base) == 3 and all(p.shape == (32, 32, 3) for p in base.values())
    # batch-independent up to float rounding (batched attention differs by ~1e-6, which may flip a pixel level)
    assert all(np.abs(base[k].astype(int) - v.astype(int)).max() <= 1 for k, v in _pixels(tmp_path / "b3").items())
    settings = json.loads((tmp_path / "base" / "generation.json").read_text())["image_settings"]
    assert settings["family"] == family and settings["guidance_scale"] == {"sd3": 7.0, "flux": 3.5}[family]

    data = _labelled(tmp_path)
    for finetune in ("full", "lora"):
        run = tmp_path / f"run-{finetune}"
        assert main(["train", "--pretrained", str(model), "--dataset", str(data), "--output-dir", str(run),
                     "--method", "dpo", "--max-steps", "2", "--batch-size", "2", "--gradient-accumulation-steps", "1",
                     "--finetune", finetune, "--lora-rank", "4", "--learning-rate", "1e-2", "--warmup-steps", "0",
                     "--checkpoint-every", "0", "--no-progress"]) == 0
        kind = trained_output_kind(run / "final")
        assert kind[0] == ("unet" if finetune == "full" else "lora")
        if finetune == "full":
            assert kind[2] == "transformer"
        out = tmp_path / f"gen-{finetune}"
        assert main(["generate", "--model", str(model), "--unet", str(run / "final"), "--out", str(out), *gen]) == 0
        trained = _pixels(out)
        assert trained.keys() == base.keys()
        assert any(not np.array_equal(trained[k], base[k]) for k in base), finetune


def test_flow_families_refuse_controlnet_and_ddpm_schedulers(flow_pipelines):
    with pytest.raises(ValueError, match="controlnet"):
        load_pipeline(flow_pipelines["sd3"], controlnet="some/controlnet")
    with pytest.raises(ValueError, match="scheduler"):
        load_pipeline(flow_pipelines["flux"], scheduler="ddim")


def test_flow_generations_go_through_evaluate_and_compare_unchanged(flow_pipelines, tiny_scorers, tmp_path):
    import pandas as pd

    from smpo.evaluation.evaluate import PAPER_SCORERS

    prompts = ["--prompts", "parti", "--categories", "Animals", "--limit", "2", "--steps", "2"]
    for family, model in flow_pipelines.items():
        assert main(["generate", "--model", str(model), *prompts, "--out", str(tmp_path / family)]) == 0
    paths = [f"--scorer-path={name}={folder}" for name, folder in tiny_scorers.items()]
    for family in flow_pipelines:
        assert main(["evaluate", str(tmp_path / family), *paths, "--num-resamples", "50"]) == 0
        scores = pd.read_parquet(tmp_path / family / "evaluation" / "scores.parquet")
        assert len(scores) == 2 and scores[list(PAPER_SCORERS)].notna().all().all()
    report = tmp_path / "report"
    assert main(["compare", *(str(tmp_path / f) for f in flow_pipelines), "--out", str(report),
                 "--num-resamples", "50"]) == 0
    table = pd.read_csv(report / "table.csv").set_index("model")
    assert list(table.index) == list(flow_pipelines)
    assert len(pd.read_csv(report / "winrates.csv")) == len(PAPER_SCORERS)  # one pair of models x 5 scorers
