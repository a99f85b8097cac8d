"""`smpo train` end to end on tiny SD1.5- and SDXL-architecture pipelines saved locally (CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smpo.cli import main
from smpo.train import TrainConfig, load_config, train
from smpo.train.checkpoint import list_checkpoints

METHODS = ("smpo", "dpo", "kto", "mapo", "sft")


@pytest.fixture(scope="module")
def caches(tiny_pipelines, labelled, tmp_path_factory) -> dict[str, Path]:
    from smpo.data.cache import build_cache
    from smpo.models import load_family

    root = tmp_path_factory.mktemp("caches")
    for family, folder in tiny_pipelines.items():
        build_cache(labelled, root / family, load_family(folder, with_network=False), progress=False)
    return {family: root / family for family in tiny_pipelines}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("source", ["images", "cache"])
def test_every_method_trains(family, source, tiny_pipelines, labelled, caches, tmp_path):
    data = ["--dataset", str(labelled)] if source == "images" else ["--cache", str(caches[family])]
    for method in METHODS:
        run = tmp_path / method
        finetune = "lora" if method in ("smpo", "mapo") else "full"
        code = main(["train", "--pretrained", str(tiny_pipelines[family]), *data, "--output-dir", str(run),
                     "--method", method, "--max-steps", "2", "--batch-size", "2", "--gradient-accumulation-steps", "1",
                     "--warmup-steps", "0", "--finetune", finetune, "--lora-rank", "4", "--checkpoint-every", "1",
                     "--keep-checkpoints", "1", "--no-progress", "--learning-rate", "1e-4"])
        assert code == 0, method
        records = _records(run)
        assert [r["step"] for r in records] == [1, 2]
        assert all(math.isfinite(r["loss"]) for r in records)
        first = records[0]["loss"]
        # At step 1 the policy equals the reference: every implicit reward is 0 (up to float
        # rounding of the two networks' errors, which beta = 5000 amplifies to ~1e-4).
        if method in ("smpo", "dpo"):
            assert first == pytest.approx(math.log(2), abs=1e-3), method  # -log sigmoid(0)
        if method == "kto":
            assert first == pytest.approx(0.5, abs=1e-3)  # 1 - sigmoid(0)
        assert records[0]["lr"] == pytest.approx(1e-4 * 2)  # scaled by the global batch of 2 pairs
        assert [p.name for p in list_checkpoints(run)] == ["step-000002"]  # keep the last 1
        saved = load_config(run / "checkpoints" / "step-000002" / "config.yaml")
        assert saved.objective.method == method and saved == load_config(run / "config.yaml")
        assert saved.objective.beta is not None and saved.objective.noising is not None  # resolved
        export = run / "final" / ("lora" if finetune == "lora" else "unet")
        assert export.is_dir() and any(export.iterdir())


def _config(pipeline: Path, data: Path, out: Path, **optim) -> TrainConfig:
    config = TrainConfig()
    config.model.pretrained, config.data.dataset, config.run.output_dir = str(pipeline), str(data), str(out)
    config.run.progress = False
    config.run.checkpoint_every = 0
    for key, value in optim.items():
        setattr(config.optim, key, value)
    return config


@pytest.mark.parametrize(("method", "steps"), [("smpo", 15), ("dpo", 30)])
def test_loss_falls_on_a_fixed_small_set(method, steps, tiny_pipelines, labelled, tmp_path):
    """Overfit check: 4 pairs, a high learning rate; the mean loss of the last 5 steps is well
    below that of the first 5 (which start at log 2)."""
    config = _config(tiny_pipelines["sd15"], labelled, tmp_path / "run", max_steps=steps, batch_size=4,
                     gradient_accumulation_steps=1, warmup_steps=0, learning_rate=2e-4, scale_lr=False)
    config.data.max_pairs = 4
    config.data.empty_prompt_rate = 0.0
    config.objective.method = method
    config.objective.beta = 500.0
    config.objective.inversion_steps = 2
    losses = [r["loss"] for r in train(config).metrics]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)
    assert last < 0.7 * first, losses


def _eval_unet(unet, family: str) -> torch.Tensor:
    """The UNet's output on a fixed input (SDXL with its added conditioning)."""
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    x = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    hidden = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    added = None
    if family == "sdxl":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled, generator=g), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])}
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=hidden, added_cond_kwargs=added).sample


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_exports_load_in_diffusers(family, tiny_pipelines, labelled, tmp_path):
    """Full: `UNet2DConditionModel.from_pretrained` gives the trained weights. LoRA:
    `pipeline.load_lora_weights` gives the trained network's outputs."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from smpo.models.lora import add_lora

    pipeline = tiny_pipelines[family]
    base = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet")
    common = dict(max_steps=2, batch_size=2, gradient_accumulation_steps=1, warmup_steps=0, learning_rate=1e-3,
                  scale_lr=False)

    full = _config(pipeline, labelled, tmp_path / "full", **common)
    full.objective.method = "dpo"
    result = train(full)
    trained = load_file(result.checkpoints[-1] / "model.safetensors")
    exported = UNet2DConditionModel.from_pretrained(result.export)
    state = exported.state_dict()
    assert set(state) == set(trained)
    assert all(torch.equal(state[k], trained[k]) for k in state)
    assert max((state[k] - v).abs().max() for k, v in base.state_dict().items()) > 1e-4  # it trained
    _check_model_card(result.export / "README.md", pipeline, "dpo", "unet", full)

    lora = _config(pipeline, labelled, tmp_path / "lora", **common)
    lora.model.finetune, lora.model.lora_rank, lora.model.lora_alpha = "lora", 4, 8.0
    result = train(lora)
    policy = add_lora(UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet"), rank=4, alpha=8.0)
    saved = load_file(result.checkpoints[-1] / "model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # checkpoints hold the adapters only
    missing, unexpected = policy.load_state_dict(saved, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    pipe = DiffusionPipeline.from_pretrained(pipeline)
    pipe.load_lora_weights(result.export)
    expected, got = _eval_unet(policy, family), _eval_unet(pipe.unet, family)
    assert (expected - _eval_unet(base, family)).abs().max() > 1e-4  # the adapters changed the network
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    _check_model_card(result.export / "README.md", pipeline, "smpo", "lora", lora)


def _check_model_card(path, pipeline, method, kind, config):
    """The hub convention: YAML metadata (base model, licence, tags), method, data, the full config."""
    import yaml

    text = path.read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["base_model"] == str(pipeline) and meta["library_name"] == "diffusers" and meta["license"]
    assert method in meta["tags"] and kind in meta["tags"]
    assert f"- method: `{method}`" in text and str(config.data.dataset) in text
    training = yaml.safe_load(text.split("## Training config")[1].split("```yaml")[1].split("```")[0])
    assert training["optim"]["max_steps"] == config.optim.max_steps and training["objective"]["method"] == method
    assert "## Last training step" in text and "| loss |" in text and "## Licence" in text


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_pipelines, labelled, tmp_path,
                                                                     monkeypatch, capsys):
    import smpo.objective

    real = smpo.objective.compute_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(smpo.objective, "compute_loss", poisoned)
    run = tmp_path / "run"
    code = main(["train", "--pretrained", str(tiny_pipelines["sd15"]), "--dataset", str(labelled),
                 "--output-dir", str(run), "--method", "dpo", "--max-steps", "5", "--batch-size", "2",
                 "--gradient-accumulation-steps", "1", "--checkpoint-every", "1", "--keep-checkpoints", "5",
                 "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert "the loss is nan at step 3" in err and "step-000002" in err
    assert [p.name for p in list_checkpoints(run)] == ["step-000001", "step-000002"]
    assert [r["step"] for r in _records(run)] == [1, 2]


def test_existing_output_is_refused(tiny_pipelines, labelled, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("")
    code = main(["train", "--pretrained", str(tiny_pipelines["sd15"]), "--dataset", str(labelled),
                 "--output-dir", str(tmp_path / "run"), "--no-progress"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "run" / "x").is_file()  # an output that existed is kept


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_bf16_mixed_precision_trains_on_the_cpu(finetune, tiny_pipelines, labelled, tmp_path):
    """bf16 autocast (accelerate) with the frozen part in bf16: the policy and the reference round
    alike, so step 1 is exactly log 2; the trainable weights and the export stay float32."""
    from diffusers import UNet2DConditionModel

    from smpo.train.setup import load_model, setup_models

    config = _config(tiny_pipelines["sd15"], labelled, tmp_path / "run", max_steps=2, batch_size=2,
                     gradient_accumulation_steps=1, warmup_steps=0, learning_rate=1e-3, scale_lr=False)
    config.run.mixed_precision = "bf16"
    config.model.finetune, config.model.lora_rank = finetune, 4
    config.objective.inversion_steps = 2
    policy, reference = setup_models(load_model(config, "cpu"), config)
    trainable = {p.dtype for p in policy.parameters() if p.requires_grad}
    frozen = {p.dtype for p in policy.parameters() if not p.requires_grad}
    if finetune == "full":
        assert trainable == {torch.float32} and reference.dtype == torch.bfloat16
    else:
        assert trainable == {torch.float32} and frozen == {torch.bfloat16}
    result = train(config)
    losses = [r["loss"] for r in result.metrics]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and all(math.isfinite(v) for v in losses)
    saved = load_file(result.checkpoints[-1] / "model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.float32}
    if finetune == "full":
        exported = UNet2DConditionModel.from_pretrained(result.export)
        assert exported.dtype == torch.float32
        assert all(torch.equal(exported.state_dict()[k], saved[k]) for k in saved)
    else:
        assert all("lora_" in k for k in saved)
