"""`smpo train --dry-run`: parameters counted from config files alone, and the memory arithmetic."""

from __future__ import annotations

import shutil

import pytest

from smpo.cli import main
from smpo.train.memory import GB, ParameterCounts, count_parameters, estimate


def _configs_only(pipeline, tmp_path):
    """A copy of ``pipeline`` without a single weight file: what is counted must come from the configs."""
    copy = tmp_path / "configs-only"
    shutil.copytree(pipeline, copy, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return copy


def test_parameters_are_counted_from_the_config_files(tiny_pipelines, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from smpo.models.lora import add_lora, lora_parameters

    pipeline = tiny_pipelines["sd15"]
    counts = count_parameters(str(_configs_only(pipeline, tmp_path)), "sd15", lora_rank=4)
    unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet")
    assert counts.network == sum(p.numel() for p in unet.parameters())
    frozen = [AutoencoderKL.from_pretrained(pipeline, subfolder="vae"),
              CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder")]
    assert counts.frozen == sum(p.numel() for m in frozen for p in m.parameters())
    add_lora(unet, rank=4)
    assert counts.lora == sum(p.numel() for p in lora_parameters(unet))


def test_the_arithmetic_of_full_and_lora_runs():
    counts = ParameterCounts(network=10**9, lora=10**7, frozen=10**8)
    whole = estimate(counts, finetune="full", optimizer="adamw", processes=8, sharded=False, reference_bytes=2,
                     compute_bytes=2, needs_reference=True, gathers_inverter=True, from_cache=False)
    # 4 (fp32 weights) + 4 (gradient) + 8 (AdamW) + 2 (half reference) bytes per parameter; encoders 2 x 0.1 B.
    assert (whole.weights, whole.gradients, whole.optimizer, whole.reference, whole.gathered) == (4e9, 4e9, 8e9, 2e9, 0)
    assert whole.total == pytest.approx(18.2 * GB)
    sharded = estimate(counts, finetune="full", optimizer="adamw", processes=8, sharded=True, reference_bytes=2,
                       compute_bytes=2, needs_reference=True, gathers_inverter=True, from_cache=True)
    assert sharded.total == pytest.approx(18e9 / 8 + 2e9)  # a shard of everything + the inverting network whole
    lora = estimate(counts, finetune="lora", optimizer="adamw", processes=1, sharded=True, reference_bytes=2,
                    compute_bytes=2, needs_reference=True, gathers_inverter=True, from_cache=True)
    assert lora.total == pytest.approx(2e9 + 16e7)  # half base weights + 4 + 4 + 8 bytes per adapter weight


def test_dry_run_prints_the_estimate_without_weights(tiny_pipelines, tmp_path, capsys):
    pipeline = _configs_only(tiny_pipelines["sd15"], tmp_path)
    assert main(["train", "--pretrained", str(pipeline), "--dry-run", "--sharding", "fsdp"]) == 0
    out = capsys.readouterr().out
    assert "sharded (FSDP2)" in out and "counted from the config files" in out
    for n in (1, 8, 64):
        assert f"{n:>3} processes:" in out
