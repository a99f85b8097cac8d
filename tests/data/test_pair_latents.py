"""`smpo pairs --keep-latents` and `smpo train --stored-latents`: every paired image's sampled latent
kept beside it (the latent its pipeline decoded, for the DDPM and the flow families, FLUX's packing
undone), and training that reads those latents instead of re-encoding the images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from smpo.cli import main
from smpo.data.pair_images import latent_from_bytes
from smpo.models.presets import save_pipeline

PROMPTS = ["a red cube", "a blue ball on grass", "two cats"]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("latent_prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _pairs(pipeline: Path, prompt_file: Path, scorer: Path, out: Path, *extra: str) -> pa.Table:
    assert main(["pairs", "--prompts", str(prompt_file), "--model", f"gen={pipeline}", "--scorer-path", str(scorer),
                 "--steps", "2", "--images-per-prompt", "3", "--batch-size", "2", "--shard-size", "2",
                 "--no-progress", "--output", str(out), *extra]) == 0
    return pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("train-*.parquet")))


def _decode(pipe, latent: torch.Tensor) -> np.ndarray:
    """The image the family's pipeline makes of a latent in training space (what its decoding does)."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        pixels = vae.decode(latent[None] / vae.config.scaling_factor + shift, return_dict=False)[0]
    return np.asarray(pipe.image_processor.postprocess(pixels, output_type="pil")[0], dtype=np.int16)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_the_kept_latents_decode_to_the_stored_images(family, prompt_file, tiny_pickscore, tmp_path):
    from smpo.evaluation.pipelines import load_pipeline

    pipeline = save_pipeline(tmp_path / family, family, "tiny")
    table = _pairs(pipeline, prompt_file, tiny_pickscore, tmp_path / "pairs", "--keep-latents")
    assert table.num_rows == len(PROMPTS)
    pipe, _ = load_pipeline(str(pipeline), device="cpu")
    channels = pipe.vae.config.latent_channels
    for row in table.to_pylist():
        for side in (0, 1):
            shape = row[f"latent_shape_{side}"]
            image = np.asarray(Image.open(io.BytesIO(row[f"jpg_{side}"])).convert("RGB"), dtype=np.int16)
            assert shape == [channels, image.shape[0] // pipe.vae_scale_factor, image.shape[1] // pipe.vae_scale_factor]
            decoded = _decode(pipe, latent_from_bytes(row[f"latent_{side}"], shape))
            # The same latent decoded alone instead of in a batch of 2: float rounding, at most one level.
            assert np.abs(decoded - image).max() <= 1
    # The images are those of a run without latents: the latents are only caught on the way.
    plain = _pairs(pipeline, prompt_file, tiny_pickscore, tmp_path / "plain")
    assert plain.column("jpg_0").to_pylist() == table.column("jpg_0").to_pylist()
    assert "latent_0" not in plain.column_names


def test_training_reads_the_stored_latents_instead_of_encoding_the_images(prompt_file, tiny_pickscore, tmp_path,
                                                                         capsys):
    from smpo.models import load_family
    from smpo.train.config import TrainConfig
    from smpo.train.data import open_pairs, pair_draws

    pipeline = save_pipeline(tmp_path / "sd15", "sd15", "tiny")
    pairs = tmp_path / "pairs"
    table = _pairs(pipeline, prompt_file, tiny_pickscore, pairs, "--keep-latents").to_pylist()
    family = load_family(str(pipeline), device="cpu")
    config = TrainConfig()
    config.model.pretrained, config.data.dataset, config.data.stored_latents = str(pipeline), str(pairs), True
    source = open_pairs(config, family)
    batch = source.batch([0, 1, 2], epoch=0)
    for k, row in enumerate(table):
        flip = pair_draws(config.run.seed, row["pair_id"], 0, empty_prompt_rate=config.data.empty_prompt_rate,
                          random_flip=True).flip
        for side, got in ((row["winner"], batch.latents_w[k]), (1 - row["winner"], batch.latents_l[k])):
            stored = latent_from_bytes(row[f"latent_{side}"], row[f"latent_shape_{side}"])
            assert torch.equal(got, stored.flip(-1) if flip else stored)
    config.data.stored_latents = False
    encoded = open_pairs(config, family).batch([0, 1, 2], epoch=0)
    assert encoded.latents_w.shape == batch.latents_w.shape
    assert not torch.allclose(encoded.latents_w, batch.latents_w, atol=1e-3)  # the VAE round trip loses something

    common = ["train", "--pretrained", str(pipeline), "--method", "dpo", "--max-steps", "1", "--batch-size", "2",
              "--gradient-accumulation-steps", "1", "--warmup-steps", "0", "--no-progress"]
    assert main([*common, "--dataset", str(pairs), "--stored-latents", "--output-dir", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "final").is_dir()
    plain = tmp_path / "plain"
    _pairs(pipeline, prompt_file, tiny_pickscore, plain)
    capsys.readouterr()
    assert main([*common, "--dataset", str(plain), "--stored-latents", "--output-dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(plain) in err[0] and "--keep-latents" in err[0]
