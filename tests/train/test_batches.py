"""Batches of pairs: each pair's images, caption, flip, empty prompt, SDXL time ids and seeds."""

from __future__ import annotations

import pytest
import torch

from smpo.data.pairs import decode_image
from smpo.models import load_family, prepare_image
from smpo.train.data import CachedPairs, ImagePairs, LabelledPairs, pair_draws

SEED, EPOCH = 3, 2


@pytest.fixture(scope="module")
def sdxl(tiny_pipelines):
    return load_family(tiny_pipelines["sdxl"])


def test_image_batches_follow_each_pairs_draws(sdxl, labelled):
    rows_source = LabelledPairs(labelled)
    pairs = ImagePairs(rows_source, sdxl, resolution=16, seed=SEED, empty_prompt_rate=0.5, random_flip=True,
                       labels="smoothed")
    indices = [5, 0, 3, 6, 1, 2, 7, 4]
    batch = pairs.batch(indices, EPOCH)
    rows = rows_source.rows(indices)
    uncond = sdxl.encode_prompts([""])
    draws = [pair_draws(SEED, r["pair_id"], EPOCH, empty_prompt_rate=0.5, random_flip=True) for r in rows]
    assert {d.flip for d in draws} == {True, False} and {d.drop_prompt for d in draws} == {True, False}
    assert batch.seeds == [d.noise_seed for d in draws]
    torch.testing.assert_close(batch.p_win, torch.tensor([r["p_win"] for r in rows]))
    for i, (row, d) in enumerate(zip(rows, draws)):
        winner = row["winner"]
        for side, latents, cond in ((winner, batch.latents_w, batch.cond), (1 - winner, batch.latents_l, batch.cond_l)):
            image = prepare_image(decode_image(row[f"jpg_{side}"]), 16, flip=d.flip)
            torch.testing.assert_close(latents[i:i + 1], sdxl.encode_images(image.pixels[None]), atol=1e-5, rtol=1e-5)
            # SDXL micro-conditioning of this very image: original (h, w), crop (top, left), target.
            height, width = image.original_size
            top, left = image.crop_top_left
            assert cond.added["time_ids"][i].tolist() == [height, width, top, left, 16, 16]
        text = uncond if d.drop_prompt else sdxl.encode_prompts([row["caption"]])
        for cond in (batch.cond, batch.cond_l):
            torch.testing.assert_close(cond.hidden_states[i:i + 1], text.hidden_states)
            torch.testing.assert_close(cond.added["text_embeds"][i:i + 1], text.added["text_embeds"])
    # The bright winners are 24 x 20 px, the dark losers 20 x 24: each keeps its own size.
    assert batch.cond.added["time_ids"][:, :2].tolist() == [[20, 24]] * 8
    assert batch.cond_l.added["time_ids"][:, :2].tolist() == [[24, 20]] * 8


def test_cache_batches_equal_image_batches(sdxl, labelled, tmp_path):
    from smpo.data.cache import build_cache

    build_cache(labelled, tmp_path / "cache", sdxl, progress=False)
    options = dict(seed=SEED, empty_prompt_rate=0.5, random_flip=False, labels="binary")
    from_images = ImagePairs(LabelledPairs(labelled), sdxl, resolution=16, **options).batch([2, 7, 1], EPOCH)
    cached = CachedPairs(tmp_path / "cache", sdxl, max_pairs=None, **options)
    assert len(cached) == 8
    from_cache = cached.batch([2, 7, 1], EPOCH)
    assert from_cache.seeds == from_images.seeds
    for name in ("latents_w", "latents_l"):  # the cache stores fp16
        torch.testing.assert_close(getattr(from_cache, name), getattr(from_images, name), atol=2e-3, rtol=2e-3)
    for a, b in ((from_cache.cond, from_images.cond), (from_cache.cond_l, from_images.cond_l)):
        torch.testing.assert_close(a.hidden_states, b.hidden_states, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(a.added["time_ids"], b.added["time_ids"])
    assert from_cache.p_win.tolist() == [1.0, 1.0, 1.0]  # binary labels
    from smpo.train import TrainConfig
    from smpo.train.data import open_pairs

    config = TrainConfig()
    config.data.cache, config.data.resolution = str(tmp_path / "cache"), 32
    with pytest.raises(ValueError, match="holds 16 px images, not the 32 px asked for"):
        open_pairs(config, sdxl)
    with pytest.raises(ValueError, match="made for a sdxl model, not sd15"):
        CachedPairs(tmp_path / "cache", type("F", (), {"name": "sd15"})(), max_pairs=None, **options)


def test_target_size_conditioning_fixes_every_sdxl_time_id(sdxl, labelled, tmp_path):
    """The authors' setting: every image's time ids are (R, R, 0, 0, R, R), from images and from the
    cache, whatever its original size (the winners are 24 x 20 px, the losers 20 x 24)."""
    from pathlib import Path

    import yaml

    from smpo.data.cache import build_cache

    build_cache(labelled, tmp_path / "cache", sdxl, progress=False)
    options = dict(seed=SEED, empty_prompt_rate=0.5, random_flip=True, labels="smoothed", size_conditioning="target")
    from_images = ImagePairs(LabelledPairs(labelled), sdxl, resolution=16, **options).batch(list(range(8)), EPOCH)
    from_cache = CachedPairs(tmp_path / "cache", sdxl, max_pairs=None, **options).batch(list(range(8)), EPOCH)
    for batch in (from_images, from_cache):
        for cond in (batch.cond, batch.cond_l or batch.cond):
            assert cond.added["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 8
        assert batch.cond_l is None  # winner and loser share the prompt's conditioning
    # The default (each image's own size) differs for these images.
    own = ImagePairs(LabelledPairs(labelled), sdxl, resolution=16, **{**options, "size_conditioning": "image"})
    assert own.batch([0], EPOCH).cond.added["time_ids"][0, :2].tolist() == [20, 24]
    # Every SDXL recipe uses the authors' setting.
    for recipe in sorted((Path(__file__).parents[2] / "configs" / "sdxl").glob("*.yaml")):
        assert yaml.safe_load(recipe.read_text())["data"]["size_conditioning"] == "target", recipe.name


def test_authors_per_image_flips_and_posterior_samples(sdxl, labelled):
    """flip_per_image: each image on its own draw; vae_sample: a posterior sample per image that does
    not depend on the batch it lands in (the authors' `latent_dist.sample()`)."""
    from smpo.train.data import pair_generator

    source = LabelledPairs(labelled)
    options = dict(resolution=16, seed=SEED, empty_prompt_rate=0.0, random_flip=True, labels="smoothed")
    pairs = ImagePairs(source, sdxl, flip_per_image=True, **options)
    rows = source.rows(list(range(8)))
    draws = [pair_draws(SEED, r["pair_id"], EPOCH, empty_prompt_rate=0.0, random_flip=True, flip_per_image=True)
             for r in rows]
    assert any(d.image_flips[0] != d.image_flips[1] for d in draws)
    batch = pairs.batch(list(range(8)), EPOCH)
    for i, (row, d) in enumerate(zip(rows, draws)):
        for side, latents in ((row["winner"], batch.latents_w), (1 - row["winner"], batch.latents_l)):
            image = prepare_image(decode_image(row[f"jpg_{side}"]), 16, flip=d.image_flips[side])
            torch.testing.assert_close(latents[i:i + 1], sdxl.encode_images(image.pixels[None]), atol=1e-5, rtol=1e-5)
    sampled = ImagePairs(source, sdxl, flip_per_image=True, vae_sample=True, **options)
    a, b = sampled.batch([3, 5], EPOCH), sampled.batch([5, 3], EPOCH)
    torch.testing.assert_close(a.latents_w[0], b.latents_w[1])
    assert not torch.allclose(a.latents_w[0], batch.latents_w[3])  # a sample, not the mean
    row, d = rows[3], draws[3]
    image = prepare_image(decode_image(row[f"jpg_{row['winner']}"]), 16, flip=d.image_flips[row["winner"]])
    dist = sdxl.vae.encode(image.pixels[None].to(sdxl.vae.dtype)).latent_dist
    eps = torch.randn(dist.mean.shape[1:], generator=pair_generator(SEED, row["pair_id"], EPOCH,
                                                                       f"posterior-{row['winner']}"))
    torch.testing.assert_close(a.latents_w[0], ((dist.mean[0] + dist.std[0] * eps) * sdxl.vae.config.scaling_factor).float())


def test_posterior_samples_need_images(tmp_path):
    from smpo.train import TrainConfig
    from smpo.train.data import open_pairs

    config = TrainConfig()
    config.data.cache, config.data.vae_sample = str(tmp_path), True
    with pytest.raises(ValueError, match="vae_sample needs the images"):
        open_pairs(config, None)
