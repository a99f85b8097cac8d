"""Cached reference inversion (`smpo cache --store-inversion` + `data.cached_inversion`): training
from the stored levels equals inverting with the reference live, within the fp16 storage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smpo.cli import main
from smpo.data.latent_cache import LatentCache


def _cache(tmp_path: Path, pipeline: Path, labelled: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name
    assert main(["cache", str(labelled), "--model", str(pipeline), "--output", str(out), "--no-progress",
                 "--shard-size", "5", *extra]) == 0
    return out


def _train(out: Path, pipeline: Path, cache: Path, *extra: str) -> list[dict]:
    assert main(["train", "--pretrained", str(pipeline), "--cache", str(cache), "--method", "smpo",
                 "--inverting-network", "reference", "--inversion-steps", "3", "--max-steps", "3", "--batch-size", "2", "--gradient-accumulation-steps", "1",
                 "--learning-rate", "1e-4", "--warmup-steps", "0", "--checkpoint-every", "0", "--no-progress",
                 "--output-dir", str(out), *extra]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _unet(run: Path) -> dict[str, torch.Tensor]:
    """A run's exported UNet weights, or a pipeline's."""
    folder = run / "final" / "unet" if (run / "final").is_dir() else run / "unet"
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def _assert_close_runs(a: list[dict], b: list[dict], run_a: Path, run_b: Path, base: Path) -> None:
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        # fp16 storage moves x_t by ~1e-3 of its scale; beta 2000 turns that into a small loss change
        assert x["loss"] == pytest.approx(y["loss"], rel=5e-2, abs=2e-3)
        assert x["model_mse_w"] == pytest.approx(y["model_mse_w"], rel=1e-3)
        assert x["ref_mse_l"] == pytest.approx(y["ref_mse_l"], rel=1e-3)
    w0, wa, wb = _unet(base), _unet(run_a), _unet(run_b)
    ua = torch.cat([(wa[k] - w0[k]).flatten() for k in w0])
    ub = torch.cat([(wb[k] - w0[k]).flatten() for k in w0])
    assert ua.abs().mean() > 1e-5  # both trained
    # Adam turns tiny gradient differences into sign flips of near-zero updates: compare the whole update
    assert (ua - ub).abs().mean() < 0.05 * ua.abs().mean()
    assert torch.nn.functional.cosine_similarity(ua, ub, dim=0) > 0.995


@pytest.mark.parametrize("family,land_on_t,plain", [("sd15", False, True), ("sd15", True, True),
                                                    ("sd15", False, False), ("sdxl", True, True)])
def test_training_from_stored_inversions_equals_live_reference_inversion(family, land_on_t, plain, tiny_pipelines,
                                                                          labelled, tmp_path):
    pipeline = tiny_pipelines[family]
    land = "--land-on-t" if land_on_t else "--no-land-on-t"
    stored = _cache(tmp_path, pipeline, labelled, "stored", "--store-inversion", "--inversion-steps", "3", land)
    cache = LatentCache(stored)
    assert cache.inversion is not None and cache.inversion.land_on_t == land_on_t
    assert tuple(cache[0].inversion[0].shape) == (3, *cache[0].latents[0].shape)
    assert cache[0].inversion[0].dtype == torch.float16
    # no flips and no dropped prompts: every image uses its stored levels; else those rows invert live
    data = ["--no-random-flip", "--empty-prompt-rate", "0"] if plain else []
    live = _train(tmp_path / "live", pipeline, stored, land, *data)
    cached = _train(tmp_path / "cached", pipeline, stored, land, "--cached-inversion", *data)
    _assert_close_runs(live, cached, tmp_path / "live", tmp_path / "cached", pipeline)
    if land_on_t or not plain:
        return
    # on the authors' grid nothing is left to compute: the reference runs only for the loss
    assert [r["unet_evals"] for r in cached] == [8, 8, 8] and min(r["unet_evals"] for r in live) > 8


def test_cached_inversion_resumes_and_splits_over_two_processes(tiny_pipelines, labelled, tmp_path):
    pipeline = tiny_pipelines["sd15"]
    stored = _cache(tmp_path, pipeline, labelled, "stored", "--store-inversion", "--inversion-steps", "3")
    common = ["--cached-inversion", "--batch-size", "1", "--gradient-accumulation-steps", "2"]  # after the defaults
    straight = _train(tmp_path / "straight", pipeline, stored, *common)
    # killed after step 2 of 3 (checkpoint at 2), then resumed: the same losses and weights
    from smpo.train.checkpoint import list_checkpoints

    resumed_dir = tmp_path / "resumed"
    _train(resumed_dir, pipeline, stored, *common, "--max-steps", "2", "--checkpoint-every", "2")
    assert [p.name for p in list_checkpoints(resumed_dir)] == ["step-000002"]
    import shutil

    shutil.rmtree(resumed_dir / "final")
    resumed = _train(resumed_dir, pipeline, stored, *common, "--resume", "--checkpoint-every", "2")
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], rel=1e-5)
    wa, wb = _unet(tmp_path / "straight"), _unet(resumed_dir)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    # two processes of one pair each == one process accumulating two
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "smpo.cli", "train", "--pretrained", str(pipeline),
               "--cache", str(stored), "--method", "smpo", "--inverting-network", "reference", "--inversion-steps", "3",
               "--max-steps", "3", "--batch-size", "1", "--gradient-accumulation-steps", "1", "--learning-rate", "1e-4",
               "--warmup-steps", "0", "--checkpoint-every", "0", "--no-progress", "--cached-inversion",
               "--output-dir", str(tmp_path / "two")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in straight], rel=1e-4)
    wc = _unet(tmp_path / "two")
    assert all(torch.allclose(wa[k], wc[k], atol=1e-5, rtol=1e-4) for k in wa)


def test_cached_inversion_errors(tiny_pipelines, labelled, tmp_path, cli_error):
    pipeline = tiny_pipelines["sd15"]
    plain = _cache(tmp_path, pipeline, labelled, "plain")
    stored = _cache(tmp_path, pipeline, labelled, "stored", "--store-inversion", "--inversion-steps", "3")
    base = ["train", "--pretrained", str(pipeline), "--method", "smpo", "--inversion-steps", "3", "--max-steps", "1",
            "--no-progress", "--cached-inversion"]
    assert "stores no inversion" in cli_error([*base, "--cache", str(plain), "--inverting-network", "reference", "--output-dir", str(tmp_path / "a")])
    assert "inverting_network=reference" in cli_error([*base, "--cache", str(stored), "--output-dir", str(tmp_path / "b")])
    assert "objective.land_on_t: True vs False" in cli_error([*base, "--cache", str(stored), "--inverting-network", "reference", "--land-on-t",
               "--output-dir", str(tmp_path / "c")])
    assert "renoise_iters" in cli_error([*base, "--cache", str(stored), "--inverting-network", "reference", "--renoise-iters", "2",
               "--output-dir", str(tmp_path / "d")])
    assert "set data.cache" in cli_error([*base, "--dataset", str(labelled), "--inverting-network", "reference",
               "--output-dir", str(tmp_path / "e")])
    assert "--store-inversion" in cli_error(["cache", str(labelled), "--model", str(pipeline), "--output", str(tmp_path / "f"), "--unet",
               str(pipeline / "unet")])
