"""Family adapters on tiny SD1.5/SDXL-architecture pipelines saved locally (the user's loading path)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from smpo.models import (
    Conditioning,
    SD15Adapter,
    SDXLAdapter,
    crop_image,
    image_pixels,
    load_family,
    prepare_image,
)
from smpo.models.presets import save_pipeline


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {family: save_pipeline(root / family, family, "tiny") for family in ("sd15", "sdxl")}


def test_auto_detects_family_and_reads_scheduler(pipelines):
    sd15 = load_family(pipelines["sd15"])
    sdxl = load_family(pipelines["sdxl"])
    assert isinstance(sd15, SD15Adapter) and isinstance(sdxl, SDXLAdapter)
    assert sd15.resolution == 16 and sd15.latent_size == 8 and sd15.latent_channels == 4
    assert sd15.prediction_type == "epsilon" and sd15.num_timesteps == 1000
    # scaled_linear betas: abar[0] = 1 - 0.00085
    assert sd15.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    assert all(not p.requires_grad for p in sd15.network.parameters())


def test_sd15_shapes_and_last_hidden_state(pipelines):
    family = load_family(pipelines["sd15"])
    latents = family.encode_images(torch.zeros(2, 3, 16, 16))
    assert latents.shape == (2, 4, 8, 8)
    cond = family.encode_prompts(["a red square", ""])
    assert cond.hidden_states.shape == (2, 77, 32) and cond.added is None
    ids = family.tokenizers[0](["a red square"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    expected = family.text_encoders[0](ids).last_hidden_state
    torch.testing.assert_close(cond.hidden_states[:1], expected)
    out = family.network_output(family.network, latents, torch.tensor([0, 999]), cond)
    assert out.shape == (2, 4, 8, 8) and family.network_evals == 2 and family.network_calls == 1


def test_sdxl_penultimate_states_pooled_and_time_ids(pipelines):
    family = load_family(pipelines["sdxl"])
    cond = family.encode_prompts(["a cat", "a dog"], original_sizes=[(20, 30), (16, 16)], crops_coords=[(0, 4), (0, 0)])
    assert cond.hidden_states.shape == (2, 77, 32 + 32)
    assert cond.added["text_embeds"].shape == (2, 32)
    # (orig h, orig w, crop top, crop left, target h, target w)
    assert cond.added["time_ids"].tolist() == [[20, 30, 0, 4, 16, 16], [16, 16, 0, 0, 16, 16]]
    ids = family.tokenizers[1](["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    out2 = family.text_encoders[1](ids, output_hidden_states=True)
    torch.testing.assert_close(cond.hidden_states[:1, :, 32:], out2.hidden_states[-2])
    torch.testing.assert_close(cond.added["text_embeds"][:1], out2.text_embeds)
    default = family.encode_prompts(["x"])
    assert default.added["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]]
    loser = family.image_conditioning(cond, original_sizes=[(40, 16), (16, 16)], crops_coords=[(12, 0), (0, 0)])
    assert loser.added["time_ids"][0].tolist() == [40, 16, 12, 0, 16, 16]
    assert torch.equal(loser.hidden_states, cond.hidden_states)
    latents = family.encode_images(torch.zeros(2, 3, 16, 16))
    assert family.network_output(family.network, latents, torch.tensor([3, 7]), cond).shape == (2, 4, 8, 8)


def test_v_prediction_matches_diffusers_get_velocity():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction")
    family = SD15Adapter(network=None, vae=None, text_encoders=[], tokenizers=[],
                         alphas_cumprod=scheduler.alphas_cumprod.float(), prediction_type="v_prediction", resolution=16)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 400, 999])
    v = family.target(x0, eps, t)
    torch.testing.assert_close(v, scheduler.get_velocity(x0, eps, t))
    x_t = family.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, scheduler.add_noise(x0, eps, t))
    torch.testing.assert_close(family.eps_from_output(v, x_t, t), eps, atol=1e-5, rtol=1e-5)
    # epsilon models: the target is eps and the output is already eps
    eps_family = SD15Adapter(network=None, vae=None, text_encoders=[], tokenizers=[],
                             alphas_cumprod=scheduler.alphas_cumprod.float(), prediction_type="epsilon", resolution=16)
    assert torch.equal(eps_family.target(x0, eps, t), eps)
    # a negative level (the authors' grid) is the clean image: abar = 1, so eps = v
    assert torch.equal(family.eps_from_output(v[:1], x_t[:1], torch.tensor([-199])), v[:1])


def test_separate_unet_and_vae_folders(pipelines, tmp_path):
    base = load_family(pipelines["sd15"])
    with torch.no_grad():
        for p in base.network.parameters():
            p.add_(0.5)
        for p in base.vae.parameters():
            p.mul_(0.5)
    base.network.save_pretrained(tmp_path / "unet_only")
    base.vae.save_pretrained(tmp_path / "vae_only")
    family = load_family(pipelines["sd15"], network=tmp_path / "unet_only", vae=tmp_path / "vae_only")
    for a, b in zip(family.network.parameters(), base.network.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(family.vae.parameters(), base.vae.parameters()):
        assert torch.equal(a, b)
    # a pipeline folder also works as --unet (its unet/ subfolder)
    again = load_family(pipelines["sd15"], network=pipelines["sd15"])
    assert not torch.equal(next(again.network.parameters()), next(base.network.parameters()))


def test_missing_model_index_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_family(tmp_path)


def test_prepare_image_resize_crop_and_range():
    image = Image.new("RGB", (30, 20), (255, 0, 0))  # width 30, height 20
    prepared = prepare_image(image, 16)
    assert prepared.original_size == (20, 30)
    assert prepared.crop_top_left == (0, 4)  # resized to 16 x 24: (24 - 16) / 2 = 4
    assert prepared.pixels.shape == (3, 16, 16)
    assert prepared.pixels[0].unique().tolist() == [1.0] and prepared.pixels[1].unique().tolist() == [-1.0]


def test_image_pixels_of_a_batch_are_each_images_pixels_mirrored_where_asked():
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (20 + k, 17, 3), generator=g, dtype=torch.uint8).numpy())
              for k in range(3)]
    flips = [True, False, True]
    squares = [crop_image(im, 16)[0] for im in images]
    pixels = image_pixels(squares, flips)
    assert pixels.shape == (3, 3, 16, 16) and pixels.is_contiguous()
    for k, image in enumerate(images):
        expected = torch.tensor(list(crop_image(image, 16)[0].getdata()), dtype=torch.float32).view(16, 16, 3)
        expected = expected.permute(2, 0, 1) / 127.5 - 1.0
        assert torch.equal(pixels[k], expected.flip(-1) if flips[k] else expected)
        assert torch.equal(prepare_image(image, 16, flip=flips[k]).pixels, pixels[k])


def test_conditioning_cat_index_and_drop_text():
    cond = Conditioning(torch.arange(6.0).view(3, 2, 1), {"text_embeds": torch.arange(3.0).view(3, 1),
                                                           "time_ids": torch.arange(18.0).view(3, 6)})
    both = Conditioning.cat([cond, cond.index([2])])
    assert both.hidden_states[:, 0, 0].tolist() == [0, 2, 4, 4]
    assert cond.repeat(2).added["time_ids"].shape == (6, 6)
    empty = Conditioning(torch.full((1, 2, 1), -1.0), {"text_embeds": torch.full((1, 1), -1.0),
                                                        "time_ids": torch.zeros(1, 6)})
    dropped = cond.drop_text(torch.tensor([False, True, False]), empty)
    assert dropped.hidden_states[:, 0, 0].tolist() == [0, -1, 4]
    assert dropped.added["text_embeds"][:, 0].tolist() == [0, -1, 2]
    assert torch.equal(dropped.added["time_ids"], cond.added["time_ids"])  # the image's size/crop stay
    assert cond.to(dtype=torch.float16).hidden_states.dtype == torch.float16


def test_guided_fn_is_classifier_free_guidance_in_one_call_on_the_rows_given():
    from smpo.models.conditioning import guided_fn

    calls: list[int] = []

    def predict(x: torch.Tensor, level: torch.Tensor, c: Conditioning) -> torch.Tensor:
        calls.append(x.shape[0])
        return x + c.hidden_states[:, 0, :]  # a stand-in network: the prompt's state shifts x

    cond = Conditioning(torch.tensor([[[1.0]], [[2.0]], [[3.0]]]))
    uncond = Conditioning(torch.tensor([[[10.0]]]))
    x, level = torch.zeros(2, 1), torch.tensor([5, 5])
    rows = torch.tensor([0, 2])
    assert guided_fn(predict, cond, None, 1.0)(x, level, index=rows).tolist() == [[1.0], [3.0]]
    calls.clear()
    # p_u + 3 (p_c - p_u): 10 + 3 (1 - 10) = -17 and 10 + 3 (3 - 10) = -11, both branches in one call of 4
    assert guided_fn(predict, cond, uncond, 3.0)(x, level, index=rows).tolist() == [[-17.0], [-11.0]]
    assert calls == [4]
    with pytest.raises(ValueError, match="uncond"):
        guided_fn(predict, cond, None, 2.0)
