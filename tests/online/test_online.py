"""`smpo online` end to end on a tiny SD1.5 pipeline and a tiny PickScore: two rounds from the CLI,
each round's pairs a Pick-a-Pic-schema set sampled from that round's policy, a SIGKILL in round 2
then a resume == an uninterrupted run, the per-round reference, replay, LoRA, two processes."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from smpo.cli import main
from smpo.models.presets import save_pipeline

PROMPTS = ["a red cube", "a blue ball on grass", "two cats", "a green tree"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return save_pipeline(tmp_path_factory.mktemp("online_pipeline") / "sd15", "sd15", "tiny")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("online_prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _options(pipeline, prompt_file, tiny_pickscore, *extra: str) -> list[str]:
    # SmPO with ReNoise inversion and smoothed labels; 4 pairs a round, 2 optimizer steps of 2 pairs.
    return ["online", "--model", str(pipeline), "--prompts", str(prompt_file), "--scorer", "pickscore",
            "--scorer-path", str(tiny_pickscore), "--rounds", "2", "--images-per-prompt", "2", "--sample-steps", "2",
            "--train-steps", "2", "--learning-rate", "1e-4", "--train-batch-size", "2",
            "--gradient-accumulation-steps", "1", "--checkpoint-every", "1", "--shard-size", "2",
            "--train-option", "optim.warmup_steps=0", "run.mixed_precision=no", "objective.inversion_steps=2",
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def uninterrupted(pipeline, prompt_file, tiny_pickscore, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("online") / "run"
    assert main([*_options(pipeline, prompt_file, tiny_pickscore, "--eval-prompts", str(prompt_file),
                           "--eval-limit", "2"), "--output", str(out)]) == 0
    return out


def _unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def _train_config(run: Path, r: int) -> dict:
    return yaml.safe_load((run / f"round-{r:03d}" / "train" / "config.yaml").read_text())


def _first_step(run: Path, r: int) -> dict:
    return json.loads((run / f"round-{r:03d}" / "train" / "metrics.jsonl").read_text().splitlines()[0])


def test_two_rounds_from_the_cli_write_each_rounds_pairs_training_and_metrics(uninterrupted, pipeline):
    from diffusers import UNet2DConditionModel

    for r in (0, 1):
        folder = uninterrupted / f"round-{r:03d}"
        assert (folder / "round.json").exists() and (folder / "eval.json").exists()
        assert (folder / "train" / "final" / "unet" / "config.json").exists()
        assert (folder / "train" / "checkpoints").is_dir()
    records = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [rec["round"] for rec in records] == [0, 1]
    for rec in records:
        assert rec["num_pairs"] == len(PROMPTS) and rec["samples"]["images"] == 2 * len(PROMPTS)
        c = rec["compute"]
        assert c["sampling_network_evals"] == 2 * len(PROMPTS) * 2 * 2  # images x steps x CFG
        assert c["training_network_evals"] > 0 and c["eval_network_evals"] == 2 * 2 * 2
        assert c["sampling_seconds"] > 0 and c["training_seconds"] > 0
    # One score range for the whole run (round 0's), so p_win means the same reward gap in both rounds.
    assert records[0]["score_range"] == records[1]["score_range"]
    meta = json.loads((uninterrupted / "round-001" / "pairs" / "pairs.json").read_text())
    assert [meta["score_min"], meta["score_max"]] == records[0]["score_range"]
    assert json.loads((uninterrupted / "eval-base.json").read_text())["images"] == 2
    # Round 1 starts where round 0 ended; its reference is the frozen base.
    config = _train_config(uninterrupted, 1)["model"]
    assert config["unet"] == str(uninterrupted / "round-000" / "train" / "final" / "unet")
    assert config["reference_unet"] == str(pipeline)
    UNet2DConditionModel.from_pretrained(uninterrupted / "final" / "unet")  # diffusers loads the result
    assert _unet_weights(uninterrupted / "final").keys() == _unet_weights(uninterrupted / "round-001" / "train"
                                                                         / "final").keys()


def test_each_rounds_pairs_are_a_pick_a_pic_set_sampled_from_that_rounds_policy(uninterrupted, pipeline):
    from smpo.data import ReadStats, iter_pairs
    from smpo.data.pair_images import encode_image
    from smpo.evaluation.generate import ImageRecord, sample_batch
    from smpo.evaluation.pipelines import load_pipeline

    starts = [None, str(uninterrupted / "round-000" / "train" / "final" / "unet")]
    for r, start in enumerate(starts):
        folder = uninterrupted / f"round-{r:03d}" / "pairs"
        stats = ReadStats()
        pairs = list(iter_pairs(folder, stats=stats))
        assert len(pairs) == len(PROMPTS) and not stats.skipped
        assert all(p.pair_id.startswith(f"r{r:03d}-") for p in pairs)
        assert {p.extra["model_0"] for p in pairs} == {f"round-{r:03d}"}
        assert json.loads((uninterrupted / f"round-{r:03d}" / "round.json").read_text())["policy_in"] == start
        # Remake one stored image with the round's starting weights and its recorded seed.
        pair = pairs[1]
        pipe, _ = load_pipeline(pipeline, unet=start)
        image = sample_batch(pipe, [ImageRecord(file="x.png", prompt_index=pair.extra["prompt_index"], image_index=0,
                                                seed=pair.extra["seed_0"], prompt=pair.caption)],
                             guidance_scale=7.5, num_inference_steps=2, height=None, width=None,
                             negative_prompt=None, control_image=None, conditioning_scale=None)[0]
        assert encode_image(image, "png") == pair.jpg_0
    seeds = [{p.extra["seed_0"] for p in iter_pairs(uninterrupted / f"round-{r:03d}" / "pairs")} for r in (0, 1)]
    assert not seeds[0] & seeds[1]  # every round samples from its own seeds


KILLER = '''import os, signal, sys
import smpo.train.loop as loop
real = loop.train_step
def train_step(setup, step):
    if "round-001" in setup.config.run.output_dir and step == 1:  # round 2, after its first checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
    return real(setup, step)
loop.train_step = train_step
from smpo.cli import main
sys.exit(main(sys.argv[1:]))
'''


def test_killed_by_sigkill_in_round_two_then_resumed_ends_with_the_uninterrupted_weights(
        uninterrupted, pipeline, prompt_file, tiny_pickscore, tmp_path):
    out = tmp_path / "killed"
    options = [*_options(pipeline, prompt_file, tiny_pickscore, "--eval-prompts", str(prompt_file), "--eval-limit",
                         "2"), "--output", str(out)]
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    done = subprocess.run([sys.executable, str(script), *options], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == -9, done.stderr[-3000:]
    assert (out / "round-000" / "round.json").exists() and not (out / "round-001" / "round.json").exists()
    assert [p.name for p in (out / "round-001" / "train" / "checkpoints").iterdir()] == ["step-000001"]
    assert main(options) == 0
    a, b = _unet_weights(out / "final"), _unet_weights(uninterrupted / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = _unet_weights(pipeline)
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-4  # it did train
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]


def test_a_changed_setting_is_refused_on_resume(uninterrupted, pipeline, prompt_file, tiny_pickscore, capsys):
    capsys.readouterr()
    assert main([*_options(pipeline, prompt_file, tiny_pickscore, "--train-steps", "3"),
                 "--output", str(uninterrupted)]) == 2
    assert "train_steps: 2 -> 3" in capsys.readouterr().err


def test_the_per_round_reference_is_the_rounds_starting_policy(uninterrupted, pipeline, prompt_file, tiny_pickscore,
                                                               tmp_path):
    out = tmp_path / "iterative"
    assert main([*_options(pipeline, prompt_file, tiny_pickscore, "--reference", "round"), "--output", str(out)]) == 0
    assert _train_config(out, 1)["model"]["reference_unet"] is None
    # Policy == reference at the first step of every round: SmPO's loss is log 2 (ALGORITHM.md section 2).
    for r in (0, 1):
        assert _first_step(out, r)["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # With the frozen base as the reference, round 1 starts away from it.
    assert abs(_first_step(uninterrupted, 1)["loss"] - math.log(2)) > 1e-4


def test_replay_trains_on_the_pairs_of_earlier_rounds_too(pipeline, prompt_file, tiny_pickscore, tmp_path):
    from smpo.train.data import LabelledPairs

    out = tmp_path / "replay"
    assert main([*_options(pipeline, prompt_file, tiny_pickscore, "--replay-rounds", "1"), "--output", str(out)]) == 0
    data = out / "round-001" / "data"
    assert sorted(p.name for p in data.iterdir()) == [f"round-{r:03d}-train-{k:05d}-of-00002.parquet"
                                                      for r in (0, 1) for k in (0, 1)]
    pairs = LabelledPairs(data)
    assert len(pairs) == 2 * len(PROMPTS) and len(set(pairs.meta["pair_id"])) == 2 * len(PROMPTS)
    assert _train_config(out, 1)["data"]["dataset"] == str(data)
    assert _train_config(out, 0)["data"]["dataset"] == str(out / "round-000" / "pairs")


@pytest.mark.parametrize("reference", ["base", "round"])
def test_lora_rounds(reference, pipeline, prompt_file, tiny_pickscore, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / f"lora-{reference}"
    assert main([*_options(pipeline, prompt_file, tiny_pickscore, "--finetune", "lora", "--lora-rank", "4",
                           "--reference", reference), "--output", str(out)]) == 0
    model = _train_config(out, 1)["model"]
    round_0 = out / "round-000"
    if reference == "base":  # round 1 continues round 0's adapters on the base: one LoRA over the base
        assert model["lora_weights"] == str(round_0 / "train" / "final" / "lora") and model["unet"] is None
        pipe = StableDiffusionPipeline.from_pretrained(pipeline)
        pipe.load_lora_weights(out / "final" / "lora")
        assert abs(_first_step(out, 1)["loss"] - math.log(2)) > 1e-4
    else:  # fresh adapters on the merged previous policy, whose adapters-off network is the reference
        assert model["lora_weights"] is None and model["unet"] == str(round_0 / "policy")
        merged, base = _unet_weights(round_0 / "policy"), _unet_weights(pipeline)
        assert max((merged[k] - base[k]).abs().max().item() for k in base) > 0
        assert _unet_weights(out / "final").keys() == base.keys()
        assert _first_step(out, 1)["loss"] == pytest.approx(math.log(2), abs=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_sample_and_train_what_one_process_does(pipeline, prompt_file, tiny_pickscore, tmp_path):
    # 2 processes x 1 pair x accumulation 1 == 1 process x 1 pair x accumulation 2; sampling split by shard.
    options = [*_options(pipeline, prompt_file, tiny_pickscore, "--eval-prompts", str(prompt_file), "--eval-limit",
                         "4"), "--train-batch-size", "1"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "smpo.cli", *options, "--gradient-accumulation-steps", "1",
               "--output", str(tmp_path / "two")]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*options, "--gradient-accumulation-steps", "2", "--output", str(tmp_path / "one")]) == 0
    for r in (0, 1):
        shards = [sorted((tmp_path / run / f"round-{r:03d}" / "pairs").glob("train-*.parquet")) for run in ("two", "one")]
        assert [p.read_bytes() for p in shards[0]] == [p.read_bytes() for p in shards[1]]
        evals = [json.loads((tmp_path / run / f"round-{r:03d}" / "eval.json").read_text()) for run in ("two", "one")]
        assert evals[0]["scores"] == pytest.approx(evals[1]["scores"], abs=1e-5)
    a, b = _unet_weights(tmp_path / "two" / "final"), _unet_weights(tmp_path / "one" / "final")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)



def test_sampled_latents_keeps_each_rounds_latents_and_trains_on_them(pipeline, prompt_file, tiny_pickscore,
                                                                      tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "latents"
    assert main([*_options(pipeline, prompt_file, tiny_pickscore, "--sampled-latents"), "--output", str(out)]) == 0
    for r in (0, 1):
        table = pq.read_table(out / f"round-{r:03d}" / "pairs" / "train-00000-of-00002.parquet")
        assert {"latent_0", "latent_1", "latent_shape_0", "latent_shape_1"} <= set(table.column_names)
        assert _train_config(out, r)["data"]["stored_latents"] is True
    assert math.isfinite(_first_step(out, 1)["loss"])
