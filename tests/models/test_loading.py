"""The one family detector, the registry, and what each adapter answers for its family (so nothing
outside ``smpo.models`` asks for a family by name)."""

from __future__ import annotations

import pytest
import torch

from smpo import inversion
from smpo.models import FAMILIES, FAMILY_NAMES, SD15Adapter, detect_family, make_adapter
from smpo.models.conditioning import Conditioning
from smpo.models.presets import build_pipeline


def test_detect_family_by_pipeline_class_then_by_components():
    assert FAMILY_NAMES == ("sd15", "sdxl", "sd3", "flux")
    assert detect_family({"_class_name": "StableDiffusion3Img2ImgPipeline"}) == "sd3"
    assert detect_family({"_class_name": "FluxControlNetPipeline"}) == "flux"
    assert detect_family({"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder_2": []}) == "sdxl"
    assert detect_family({"_class_name": "StableDiffusionInpaintPipeline", "text_encoder": []}) == "sd15"
    # a class no family names, with a UNet: read by its text encoders
    assert detect_family({"_class_name": "LatentConsistencyModelPipeline", "unet": [], "text_encoder": []}) == "sd15"
    assert detect_family({"_class_name": "CustomPipeline", "unet": [], "text_encoder": [],
                          "text_encoder_2": []}) == "sdxl"
    with pytest.raises(ValueError, match="PixArtAlphaPipeline"):
        detect_family({"_class_name": "PixArtAlphaPipeline", "transformer": [], "text_encoder": []})


def test_detect_family_of_a_folder_without_model_index(tmp_path):
    with pytest.raises(ValueError, match="not a diffusers pipeline"):
        detect_family(tmp_path)


def test_each_adapter_answers_its_family_questions():
    answers = {name: (cls.controlnet_pipeline_class, cls.has_safety_checker, cls.scheduler_swappable,
                      cls.stores_inversion, cls.supports_inversion_noise, cls.network_folder)
               for name, cls in FAMILIES.items()}
    assert answers == {
        "sd15": ("StableDiffusionControlNetPipeline", True, True, True, True, "unet"),
        "sdxl": ("StableDiffusionXLControlNetPipeline", False, True, True, True, "unet"),
        "sd3": (None, False, False, False, False, "transformer"),
        "flux": (None, False, False, False, False, "transformer"),
    }
    assert FAMILIES["sd15"].pipeline_kwargs(safety_checker=False) == {"safety_checker": None,
                                                                       "requires_safety_checker": False}
    assert FAMILIES["sd15"].pipeline_kwargs(safety_checker=True) == {}
    assert FAMILIES["sdxl"].pipeline_kwargs(safety_checker=False) == {}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_an_adapter_from_a_pipeline_object_through_its_text_encoder_names(family):
    pipe = build_pipeline(family, "tiny")
    cls = FAMILIES[family]
    encoders = [getattr(pipe, folder) for folder, _ in cls.text_encoder_classes]
    tokenizers = [getattr(pipe, cls.tokenizer_folder(folder)) for folder, _ in cls.text_encoder_classes]
    assert [type(e).__name__ for e in encoders] == [kind for _, kind in cls.text_encoder_classes]
    adapter = make_adapter(family, network=getattr(pipe, cls.network_folder), vae=pipe.vae, text_encoders=encoders,
                           tokenizers=tokenizers, scheduler=pipe.scheduler)
    assert type(adapter) is cls and adapter.num_timesteps == 1000
    cond = adapter.encode_prompts(["a red square"])
    x = torch.zeros(1, adapter.latent_channels, adapter.latent_size, adapter.latent_size)
    assert adapter.network_output(adapter.network, x, torch.tensor([500]), cond).shape == x.shape


def _analytic_family() -> SD15Adapter:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    abar = torch.cumprod(1 - betas, 0)
    return SD15Adapter(network=None, vae=None, text_encoders=[], tokenizers=[], alphas_cumprod=abar,
                       prediction_type="epsilon", resolution=16, set_alpha_to_one=False)


class _Scaled(torch.nn.Module):
    """A stand-in UNet: ``0.3 x + 0.01 t`` plus the mean of the text states."""

    dtype = torch.float32

    def forward(self, x, t, encoder_hidden_states, return_dict=False):
        shift = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return (0.3 * x + 0.01 * t.float().view(-1, 1, 1, 1) + shift,)


@pytest.mark.parametrize("land_on_t", [False, True])
def test_the_stored_inversion_methods_are_the_inversion_module_with_the_family_schedule(land_on_t):
    family, network = _analytic_family(), _Scaled()
    g = torch.Generator().manual_seed(0)
    x0, cond = torch.randn(3, 4, 8, 8, generator=g), Conditioning(torch.randn(3, 2, 5, generator=g))
    t = torch.tensor([10, 450, 990])
    kw = dict(num_steps=5, renoise_iters=1, land_on_t=land_on_t)
    eps_fn = family.eps_fn(network, cond)
    stored = family.invert_to_levels(network, x0, cond, uncond=None, **kw)
    torch.testing.assert_close(stored, inversion.invert_to_levels(eps_fn, x0, family.alphas_cumprod,
                                                                  initial_abar=family.initial_abar, **kw),
                               rtol=0, atol=0)
    x_t = family.finish_from_levels(network, x0, stored, t, cond, uncond=None, **kw)
    torch.testing.assert_close(x_t, inversion.finish_from_levels(eps_fn, x0, stored, t, family.alphas_cumprod, **kw),
                               rtol=0, atol=0)
    torch.testing.assert_close(family.implied_noise(x_t, x0, t),
                               inversion.implied_noise(x_t, x0, t, family.alphas_cumprod), rtol=0, atol=0)
    live, eps_hat = family.invert(network, x0, t, cond, uncond=None, **kw)
    expected = inversion.renoise_invert(eps_fn, x0, t, family.alphas_cumprod, initial_abar=family.initial_abar, **kw)
    torch.testing.assert_close(live, expected, rtol=0, atol=0)
    torch.testing.assert_close(eps_hat, family.implied_noise(expected, x0, t), rtol=0, atol=0)


def test_a_flow_family_stores_no_inversion_and_has_no_step_noise():
    pipe = build_pipeline("sd3", "tiny")
    cls = FAMILIES["sd3"]
    adapter = make_adapter("sd3", network=pipe.transformer, vae=pipe.vae,
                           text_encoders=[getattr(pipe, f) for f, _ in cls.text_encoder_classes],
                           tokenizers=[getattr(pipe, cls.tokenizer_folder(f)) for f, _ in cls.text_encoder_classes],
                           scheduler=pipe.scheduler)
    cond = adapter.encode_prompts(["x"])
    x0 = torch.zeros(1, 4, adapter.latent_size, adapter.latent_size)
    with pytest.raises(ValueError, match="stored inversions are DDIM inversions"):
        adapter.invert_to_levels(adapter.network, x0, cond, uncond=None, num_steps=4, renoise_iters=1)
    with pytest.raises(ValueError, match="not defined for flow"):
        adapter.invert(adapter.network, x0, torch.tensor([500]), cond, uncond=None, num_steps=4, renoise_iters=1,
                       step_noise=0.1)
