"""SD3 and FLUX adapters on tiny pipelines saved locally: loading, prompts, the flow parametrisation,
and the network call checked against the diffusers pipelines' own sampling loops."""

from __future__ import annotations

import pytest
import torch

from smpo.models import detect_family, load_family
from smpo.models.flow import FluxAdapter, SD3Adapter
from smpo.models.presets import save_pipeline

FLOW = ("sd3", "flux")


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-pipelines")
    return {family: save_pipeline(root / family, family, "tiny") for family in FLOW}


def _pipeline(family, folder):
    import diffusers

    cls = diffusers.StableDiffusion3Pipeline if family == "sd3" else diffusers.FluxPipeline
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_detect_family_reads_the_pipeline_class():
    assert detect_family({"_class_name": "StableDiffusion3Pipeline", "text_encoder_2": [], "text_encoder_3": []}) == "sd3"
    assert detect_family({"_class_name": "FluxPipeline", "text_encoder_2": []}) == "flux"
    assert detect_family({"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": []}) == "sdxl"
    assert detect_family({"_class_name": "StableDiffusionPipeline"}) == "sd15"


@pytest.mark.parametrize("family", FLOW)
def test_auto_loads_the_family_and_its_training_sigmas(family, pipelines):
    adapter = load_family(pipelines[family])
    assert isinstance(adapter, SD3Adapter if family == "sd3" else FluxAdapter)
    assert adapter.name == family and adapter.prediction_type == "flow"
    assert adapter.resolution == 32 and adapter.latent_size == 16 and adapter.latent_channels == 4
    assert adapter.num_timesteps == 1000 and adapter.max_sequence_length == 32
    assert all(not p.requires_grad for p in adapter.network.parameters())
    s = adapter.sigmas
    assert bool((s[1:] > s[:-1]).all()) and s[-1].item() == pytest.approx(1.0)
    base = torch.arange(1, 1001) / 1000
    if family == "sd3":  # shift 3
        torch.testing.assert_close(s, 3 * base / (1 + 2 * base))
    else:  # FLUX.1-dev's dynamic shifting: the training table is not shifted
        torch.testing.assert_close(s, base)
    # a flow family's schedule is its sigmas: no variance-preserving alphas_cumprod, no stored inversion
    assert not hasattr(adapter, "alphas_cumprod") and not adapter.stores_inversion
    without = load_family(pipelines[family], with_network=False)
    assert without.network is None and without.resolution == 32


@pytest.mark.parametrize("family", FLOW)
def test_add_noise_target_and_eps_match_the_scheduler(family, pipelines):
    adapter = load_family(pipelines[family], with_network=False)
    scheduler = _pipeline(family, pipelines[family]).scheduler
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor([0, 500, 999])
    descending = scheduler.timesteps  # scheduler.timesteps[k] is level 999 - k
    x_t = adapter.add_noise(x0, eps, t)
    expected = torch.cat([scheduler.scale_noise(x0[i:i + 1], descending[999 - int(t[i])][None], eps[i:i + 1])
                          for i in range(3)])
    torch.testing.assert_close(x_t, expected)
    v = adapter.target(x0, eps, t)
    torch.testing.assert_close(v, eps - x0)
    torch.testing.assert_close(adapter.eps_from_output(v, x_t, t), eps, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FLOW)
def test_prompts_match_the_pipeline_encode_prompt(family, pipelines):
    adapter = load_family(pipelines[family])
    pipe = _pipeline(family, pipelines[family])
    cond = adapter.encode_prompts(["a red square", ""])
    if family == "sd3":
        hidden, _, pooled, _ = pipe.encode_prompt("a red square", None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=32)
        assert cond.hidden_states.shape == (2, 77 + 32, 32) and cond.added["text_embeds"].shape == (2, 32)
    else:
        hidden, pooled, _ = pipe.encode_prompt("a red square", None, max_sequence_length=32)
        assert cond.hidden_states.shape == (2, 32, 32) and cond.added["text_embeds"].shape == (2, 16)
    torch.testing.assert_close(cond.hidden_states[:1], hidden)
    torch.testing.assert_close(cond.added["text_embeds"][:1], pooled)


@pytest.mark.parametrize("family", FLOW)
def test_two_euler_steps_of_the_pipeline_equal_two_adapter_velocity_steps(family, pipelines):
    """The pipeline's own loop (guidance 1 for SD3, FLUX's distilled guidance 3.5) from given latents
    equals ``x <- x + (s' - s) v(x, s)`` with the adapter's velocity: timestep scale, packing,
    position ids, pooled projections and text all as the pipeline has them."""
    adapter = load_family(pipelines[family])
    pipe = _pipeline(family, pipelines[family])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="latent", max_sequence_length=32)
    if family == "sd3":
        out = pipe("a red square", latents=x, guidance_scale=1.0, **kwargs).images
    else:
        packed = pipe._pack_latents(x, 1, 4, 16, 16)
        out = pipe("a red square", latents=packed, guidance_scale=adapter.guidance, **kwargs).images
        out = pipe._unpack_latents(out, 32, 32, pipe.vae_scale_factor)
    sigmas = pipe.scheduler.sigmas.tolist()  # [1, s2, 0] after the call
    assert len(sigmas) == 3 and 0 < sigmas[1] < 1
    cond = adapter.encode_prompts(["a red square"])
    mine = x.clone()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        mine = mine + (s_next - s) * adapter.velocity(adapter.network, mine, torch.tensor([s]), cond)
    torch.testing.assert_close(mine, out, atol=1e-5, rtol=1e-4)
