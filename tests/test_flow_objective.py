"""The objective on a flow family (tiny SD3): forward noising, velocity errors, the DPO loss and the
SmPO loss over inverted points, each spelled out by hand with direct transformer calls."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from smpo.batch import PairBatch
from smpo.inversion import flow_grid, flow_renoise_invert
from smpo.models import load_family
from smpo.models.presets import save_pipeline
from smpo.objective import ObjectiveConfig, compute_loss, draw_t_and_noise


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    family = load_family(save_pipeline(tmp_path_factory.mktemp("sd3") / "p", "sd3", "tiny"))
    reference = copy.deepcopy(family.network)
    with torch.no_grad():  # a reference that differs from the policy, so the loss is not log 2
        for p in reference.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    g = torch.Generator().manual_seed(0)
    cond = family.encode_prompts(["a red square", "a blue circle"])
    batch = PairBatch(latents_w=torch.randn(2, 4, 16, 16, generator=g), latents_l=torch.randn(2, 4, 16, 16, generator=g),
                      cond=cond, p_win=torch.tensor([0.9, 0.6]), seeds=[11, 12])
    return family, reference, batch


def _velocity(network, x, sigma, cond):
    """SD3's transformer called as StableDiffusion3Pipeline calls it (timestep = sigma * 1000)."""
    return network(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond.hidden_states,
                   pooled_projections=cond.added["text_embeds"], return_dict=False)[0]


def test_dpo_with_forward_noising_by_hand(setup):
    family, reference, batch = setup
    beta = 1000.0
    out = compute_loss(family, family.network, reference, batch, ObjectiveConfig(method="dpo", beta=beta))
    t, eps = draw_t_and_noise(batch.seeds, (4, 16, 16), 1000)
    s = family.sigmas[t]
    x0 = torch.cat([batch.latents_w, batch.latents_l])
    s2, eps2, cond2 = torch.cat([s, s]), torch.cat([eps, eps]), batch.cond.repeat(2)
    x_s = (1 - s2.view(-1, 1, 1, 1)) * x0 + s2.view(-1, 1, 1, 1) * eps2  # x_s = (1 - s) x0 + s eps
    with torch.no_grad():
        m = (eps2 - x0 - _velocity(family.network, x_s, s2, cond2)).pow(2).mean(dim=(1, 2, 3))
        r = (eps2 - x0 - _velocity(reference, x_s, s2, cond2)).pow(2).mean(dim=(1, 2, 3))
    inside = -0.5 * beta * ((m[:2] - r[:2]) - (m[2:] - r[2:]))
    torch.testing.assert_close(out.loss, -F.logsigmoid(inside).mean(), rtol=1e-4, atol=1e-5)


def test_smpo_over_the_renoise_inverted_point_by_hand(setup):
    family, reference, batch = setup
    beta, gamma = 400.0, 10.0
    cfg = ObjectiveConfig(method="smpo", beta=beta, gamma=gamma, inversion_steps=4, renoise_iters=2)
    out = compute_loss(family, family.network, reference, batch, cfg)
    t, _ = draw_t_and_noise(batch.seeds, (4, 16, 16), 1000)
    x0 = torch.cat([batch.latents_w, batch.latents_l])
    s2, cond2 = torch.cat([family.sigmas[t]] * 2), batch.cond.repeat(2)
    with torch.no_grad():
        x_s = flow_renoise_invert(lambda x, s, index: _velocity(family.network, x, s, cond2.index(index)), x0, s2,
                                  flow_grid(4, family.sigmas), renoise_iters=2)
        v_hat = (x_s - x0) / s2.view(-1, 1, 1, 1)  # the implied velocity eps_hat - x0
        m = (v_hat - _velocity(family.network, x_s, s2, cond2)).pow(2).mean(dim=(1, 2, 3))
        r = (v_hat - _velocity(reference, x_s, s2, cond2)).pow(2).mean(dim=(1, 2, 3))
    lam = gamma * (2 * batch.p_win - 1)
    inside = -0.5 * beta * lam * ((m[:2] - r[:2]) - (m[2:] - r[2:]))
    torch.testing.assert_close(out.loss, -F.logsigmoid(inside).mean(), rtol=1e-4, atol=1e-5)


def test_flow_inversion_refuses_inpo_noise(setup):
    family, reference, batch = setup
    with pytest.raises(ValueError, match="not defined for flow"):
        compute_loss(family, family.network, reference, batch, ObjectiveConfig(method="smpo", inversion_noise=0.1))


@pytest.mark.parametrize("scheme", ["logit_normal", "mode"])
def test_timestep_sampling_schemes_follow_diffusers(scheme):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    t, eps = draw_t_and_noise([5, 6], (2,), 1000, sampling=scheme, logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    for i, seed in enumerate([5, 6]):
        g = torch.Generator().manual_seed(seed)
        u = compute_density_for_timestep_sampling(scheme, 1, logit_mean=0.0, logit_std=1.0, mode_scale=1.29, generator=g)
        # diffusers indexes the descending scheduler.timesteps with int(u T): ascending level T - 1 - int(u T)
        assert int(t[i]) == 999 - int(u * 1000)
        torch.testing.assert_close(eps[i], torch.randn(2, generator=g))
    with pytest.raises(ValueError, match="timestep_sampling"):
        ObjectiveConfig(timestep_sampling="cosine").resolved()
