"""`smpo train` and `smpo cache` end to end on tiny SD3 and FLUX pipelines (CPU): every method, full
and LoRA, from images and from the cache; overfitting one pair; the exports load into diffusers'
``StableDiffusion3Pipeline`` / ``FluxPipeline`` and generate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from smpo.cli import main
from smpo.models.presets import save_pipeline
from smpo.train import TrainConfig, train

FLOW = ("sd3", "flux")
METHODS = ("smpo", "dpo", "kto", "mapo", "sft")


@pytest.fixture(scope="module")
def flow_pipelines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow-pipelines")
    return {family: save_pipeline(root / family, family, "tiny") for family in FLOW}


@pytest.fixture(scope="module")
def flow_caches(flow_pipelines, labelled, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow-caches")
    for family, folder in flow_pipelines.items():
        assert main(["cache", str(labelled), "--model", str(folder), "--output", str(root / family),
                     "--no-progress"]) == 0
    return {family: root / family for family in FLOW}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train_argv(pipeline: Path, data: list[str], run: Path, method: str, finetune: str, *extra: str) -> list[str]:
    return ["train", "--pretrained", str(pipeline), *data, "--output-dir", str(run), "--method", method,
            "--max-steps", "1", "--batch-size", "2", "--gradient-accumulation-steps", "1", "--warmup-steps", "0",
            "--finetune", finetune, "--lora-rank", "4", "--checkpoint-every", "0", "--no-progress",
            "--learning-rate", "1e-4", *extra]


def test_the_cache_holds_latents_and_the_family_text_embeddings(flow_caches):
    from smpo.data.latent_cache import LatentCache

    sd3, flux = LatentCache(flow_caches["sd3"]), LatentCache(flow_caches["flux"])
    assert sd3.family == "sd3" and flux.family == "flux" and sd3.resolution == 32 and len(sd3) == 8
    pair = sd3[0]
    assert pair.latents[0].shape == (4, 16, 16)
    assert pair.hidden_states.shape == (77 + 32, 32) and pair.text_added["text_embeds"].shape == (32,)
    assert flux[0].hidden_states.shape == (32, 32) and flux[0].text_added["text_embeds"].shape == (16,)
    assert sd3.empty_conditioning().added["text_embeds"].shape == (1, 32)


@pytest.mark.parametrize("family", FLOW)
@pytest.mark.parametrize("source", ["images", "cache"])
def test_every_method_trains_full_and_lora(family, source, flow_pipelines, flow_caches, labelled, tmp_path):
    data = ["--dataset", str(labelled)] if source == "images" else ["--cache", str(flow_caches[family])]
    for method in METHODS:
        for finetune in ("full", "lora"):
            run = tmp_path / f"{method}-{finetune}"
            assert main(_train_argv(flow_pipelines[family], data, run, method, finetune)) == 0, (method, finetune)
            record = _records(run)[0]
            assert math.isfinite(record["loss"])
            # step 1: the policy equals the reference, every implicit reward is 0
            if method in ("smpo", "dpo"):
                assert record["loss"] == pytest.approx(math.log(2), abs=1e-3), (method, finetune)
            if method == "kto":
                assert record["loss"] == pytest.approx(0.5, abs=1e-3)
            # smpo inverts with 5 grid steps and 1 renoise iteration, both images of 2 pairs
            if method == "smpo":
                assert record["unet_evals"] > 8
            export = run / "final" / ("lora" if finetune == "lora" else "transformer")
            assert export.is_dir() and any(export.iterdir())


@pytest.mark.parametrize("family", FLOW)
@pytest.mark.parametrize("method", ["smpo", "dpo"])
def test_a_few_steps_overfit_one_pair(family, method, flow_pipelines, labelled, tmp_path):
    config = TrainConfig()
    config.model.pretrained, config.data.dataset = str(flow_pipelines[family]), str(labelled)
    config.run.output_dir, config.run.progress, config.run.checkpoint_every = str(tmp_path / "run"), False, 0
    config.data.max_pairs = 1
    config.objective.method = method
    config.objective.beta = 1000.0
    config.optim.max_steps, config.optim.batch_size, config.optim.warmup_steps = 12, 1, 0
    config.optim.gradient_accumulation_steps = 1
    config.optim.learning_rate, config.optim.scale_lr = 1e-3, False
    losses = [r["loss"] for r in train(config).metrics]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)
    assert max(losses[-3:]) < 0.5 * math.log(2), losses


@pytest.mark.parametrize("family", FLOW)
def test_exports_load_into_the_diffusers_pipeline_and_generate(family, flow_pipelines, labelled, tmp_path):
    import diffusers
    from safetensors.torch import load_file

    folder = flow_pipelines[family]
    cls = getattr(diffusers, {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family])
    network = getattr(diffusers, {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}[family])
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="pt", max_sequence_length=32)

    def generate(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images

    base = generate(cls.from_pretrained(folder))
    for finetune in ("full", "lora"):
        run = tmp_path / finetune
        argv = _train_argv(folder, ["--dataset", str(labelled)], run, "dpo", finetune)
        argv[argv.index("--learning-rate") + 1] = "1e-2"
        argv[argv.index("--max-steps") + 1] = "2"
        assert main(argv) == 0
        if finetune == "full":
            pipe = cls.from_pretrained(folder, transformer=network.from_pretrained(run / "final" / "transformer"))
        else:
            pipe = cls.from_pretrained(folder)
            pipe.load_lora_weights(run / "final" / "lora")
            saved = load_file(str(run / "final" / "lora" / "pytorch_lora_weights.safetensors"))
            assert saved and all(k.startswith("transformer.") for k in saved)
            loaded = [n for n, _ in pipe.transformer.named_parameters() if "lora_" in n]
            assert len(loaded) == len(saved)  # every saved LoRA matrix found its module
        image = generate(pipe)
        assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
        assert (image - base).abs().max() > 1e-3, finetune  # the trained weights are in use
        card = (run / "final" / ("lora" if finetune == "lora" else "transformer") / "README.md").read_text()
        assert cls.__name__ in card


@pytest.mark.parametrize("family", FLOW)
def test_the_flow_recipes_run_on_the_tiny_model(family, flow_pipelines, labelled, tmp_path):
    from smpo.train import load_config

    for method in METHODS:
        config = load_config(Path(__file__).resolve().parents[2] / "configs" / family / f"{method}.yaml")
        config.model.pretrained, config.data.dataset = str(flow_pipelines[family]), str(labelled)
        config.run.output_dir, config.run.progress, config.run.checkpoint_every = str(tmp_path / method), False, 0
        config.run.mixed_precision = "no"
        config.model.lora_rank = 4
        config.optim.max_steps, config.optim.gradient_accumulation_steps = 1, 1
        result = train(config)
        assert math.isfinite(result.metrics[0]["loss"]) and result.export is not None and result.export.is_dir()


@pytest.mark.parametrize("family,finetune", [("sd3", "full"), ("flux", "lora")])
def test_a_resumed_flow_run_equals_an_uninterrupted_one(family, finetune, flow_pipelines, labelled, tmp_path):
    from safetensors.torch import load_file

    from smpo.train.checkpoint import list_checkpoints

    argv = _train_argv(flow_pipelines[family], ["--dataset", str(labelled)], tmp_path / "straight", "smpo", finetune,
                       "--batch-size", "1")
    argv[argv.index("--max-steps") + 1] = "4"
    argv[argv.index("--checkpoint-every") + 1] = "2"
    assert main(argv) == 0
    killed = [a if a != str(tmp_path / "straight") else str(tmp_path / "killed") for a in argv]
    short = list(killed)
    short[short.index("--max-steps") + 1] = "2"
    assert main(short) == 0  # stops after step 2 with its checkpoint: the "killed" run
    assert [p.name for p in list_checkpoints(tmp_path / "killed")] == ["step-000002"]
    import shutil

    shutil.rmtree(tmp_path / "killed" / "final")
    assert main([*killed, "--resume"]) == 0
    a, b = _records(tmp_path / "straight"), _records(tmp_path / "killed")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5, abs=1e-7)
    name = "transformer/diffusion_pytorch_model.safetensors" if finetune == "full" else "lora/pytorch_lora_weights.safetensors"
    wa, wb = load_file(tmp_path / "straight" / "final" / name), load_file(tmp_path / "killed" / "final" / name)
    assert set(wa) == set(wb) and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
