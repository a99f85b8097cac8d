"""The per-batch objective on a stand-in network with a known formula (ALGORITHM.md sections 1-5)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from smpo.batch import ImageBatch, PairBatch
from smpo.inversion import implied_noise, renoise_invert
from smpo.losses import LOG2, LossOutput
from smpo.models import Conditioning, SD15Adapter
from smpo.objective import ObjectiveConfig, compute_loss, draw_t_and_noise

T = 1000


def _alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class StandIn(torch.nn.Module):
    """``out = w * x * (1 + t / 1000) + mean(c)``: per sample, differentiable in ``w``; records its calls."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))
        self.calls: list[tuple[torch.Tensor, torch.Tensor, bool]] = []

    def formula(self, x, t, states):
        return self.w * x * (1 + t.float().view(-1, 1, 1, 1) / 1000) + states.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    def forward(self, x, t, encoder_hidden_states, added_cond_kwargs=None, return_dict=False):
        self.calls.append((x.detach().clone(), t.clone(), torch.is_grad_enabled()))
        return (self.formula(x, t, encoder_hidden_states),)


def _family() -> SD15Adapter:
    return SD15Adapter(network=None, vae=None, text_encoders=[], tokenizers=[], alphas_cumprod=_alphas_cumprod(),
                       prediction_type="epsilon", resolution=16)


def _batch(n: int = 2, seeds=None, p_win=None) -> PairBatch:
    g = torch.Generator().manual_seed(123)
    return PairBatch(
        latents_w=torch.randn(n, 4, 4, 4, generator=g), latents_l=torch.randn(n, 4, 4, 4, generator=g),
        cond=Conditioning(torch.randn(n, 3, 2, generator=g)),
        p_win=torch.tensor(p_win if p_win is not None else [0.7, 0.6][:n]),
        seeds=list(seeds if seeds is not None else [11, 22][:n]),
    )


def _select(batch: PairBatch, i: int) -> PairBatch:
    return PairBatch(batch.latents_w[i:i + 1], batch.latents_l[i:i + 1], batch.cond.index([i]),
                     batch.p_win[i:i + 1], [batch.seeds[i]])


def test_pairs_share_t_and_noise_drawn_from_their_seeds():
    family, policy, reference = _family(), StandIn(0.3), StandIn(0.2)
    batch = _batch()
    compute_loss(family, policy, reference, batch, ObjectiveConfig(method="dpo"))
    (x_t, t, grad), = policy.calls
    assert grad and t.tolist()[:2] == t.tolist()[2:]  # winner i and loser i share t
    for i, seed in enumerate(batch.seeds):
        g = torch.Generator().manual_seed(seed)
        t_i = torch.randint(0, T, (1,), generator=g).item()
        eps_i = torch.randn(4, 4, 4, generator=g)
        assert t[i].item() == t_i
        abar = family.alphas_cumprod[t_i]
        for x0, row in ((batch.latents_w[i], i), (batch.latents_l[i], i + 2)):  # the same eps for both images
            torch.testing.assert_close(x_t[row], abar.sqrt() * x0 + (1 - abar).sqrt() * eps_i)
    assert family.network_evals == 8 and family.network_calls == 2  # one call of 2B per network


def test_dpo_loss_value_by_hand():
    family, policy, reference = _family(), StandIn(0.3), StandIn(0.2)
    batch = _batch()
    out = compute_loss(family, policy, reference, batch, ObjectiveConfig(method="dpo", beta=50.0))
    t, eps = draw_t_and_noise(batch.seeds, (4, 4, 4), T)
    abar = family.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = []
    for i in range(2):
        errs = {}
        for name, x0 in (("w", batch.latents_w[i]), ("l", batch.latents_l[i])):
            x_t = abar[i].sqrt() * x0 + (1 - abar[i]).sqrt() * eps[i]
            scale = 1 + t[i].item() / 1000
            c = batch.cond.hidden_states[i].mean()
            errs["m" + name] = ((eps[i] - (0.3 * x_t * scale + c)) ** 2).mean().item()
            errs["r" + name] = ((eps[i] - (0.2 * x_t * scale + c)) ** 2).mean().item()
        inside = -25.0 * ((errs["mw"] - errs["rw"]) - (errs["ml"] - errs["rl"]))
        expected.append(-math.log(1 / (1 + math.exp(-inside))))
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("noising", ["forward", "renoise"])
@pytest.mark.parametrize("method", ["smpo", "dpo", "mapo", "sft"])
def test_batch_of_two_equals_two_batches_of_one(method, noising):
    family, policy, reference = _family(), StandIn(0.3), StandIn(0.2)
    cfg = ObjectiveConfig(method=method, noising=noising, beta=40.0 if method != "mapo" else 0.1)
    batch = _batch()
    both = compute_loss(family, policy, reference, batch, cfg).losses
    single = torch.cat([compute_loss(family, policy, reference, _select(batch, i), cfg).losses for i in range(2)])
    torch.testing.assert_close(both, single, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("gamma", [1.0, 3.0])
def test_smpo_forward_binary_is_dpo(gamma):
    family, policy, reference = _family(), StandIn(0.3), StandIn(0.2)
    batch = _batch(p_win=[0.55, 0.7])
    smpo = compute_loss(family, policy, reference, batch,
                        ObjectiveConfig(method="smpo", noising="forward", labels="binary", beta=30.0, gamma=gamma))
    # binary labels are the DPO rungs of the ablation ladder: lambda = 1 whatever gamma
    dpo = compute_loss(family, policy, reference, batch, ObjectiveConfig(method="dpo", beta=30.0))
    torch.testing.assert_close(smpo.losses, dpo.losses)
    smoothed = compute_loss(family, policy, reference, batch,
                            ObjectiveConfig(method="smpo", noising="forward", beta=30.0, gamma=gamma))
    assert not torch.allclose(smoothed.losses, dpo.losses)  # p_win < 1 weakens the pair


@pytest.mark.parametrize("land_on_t", [True, False])
def test_smpo_uses_the_inverted_latent_and_its_implied_noise(land_on_t):
    family, policy, reference = _family(), StandIn(0.3), StandIn(0.2)
    batch = _batch()
    cfg = ObjectiveConfig(method="smpo", beta=20.0, gamma=10.0, inversion_steps=4, renoise_iters=2,
                          land_on_t=land_on_t)
    out = compute_loss(family, policy, reference, batch, cfg)
    t, _ = draw_t_and_noise(batch.seeds, (4, 4, 4), T)
    t2 = torch.cat([t, t])
    x0 = torch.cat([batch.latents_w, batch.latents_l])
    states = batch.cond.hidden_states.repeat(2, 1, 1)
    with torch.no_grad():
        def eps_fn(x, level, index=None):
            rows = index if index is not None else torch.arange(4)
            return policy.formula(x, level, states[rows])

        expected_x_t = renoise_invert(eps_fn, x0, t2, family.alphas_cumprod, num_steps=4, renoise_iters=2,
                                      land_on_t=land_on_t, initial_abar=family.initial_abar)
        eps_hat = implied_noise(expected_x_t, x0, t2, family.alphas_cumprod)
    grad_calls = [c for c in policy.calls if c[2]]
    assert len(grad_calls) == 1 and len(policy.calls) > 1  # the policy inverted (under no_grad), then trained
    torch.testing.assert_close(grad_calls[0][0], expected_x_t)
    torch.testing.assert_close(reference.calls[0][0], expected_x_t)
    with torch.no_grad():
        m = ((policy.formula(expected_x_t, t2, states) - eps_hat) ** 2).flatten(1).mean(1)
        r = ((reference.formula(expected_x_t, t2, states) - eps_hat) ** 2).flatten(1).mean(1)
        lam = 10.0 * (2 * batch.p_win - 1)
        expected = -F.logsigmoid(-10.0 * lam * ((m[:2] - r[:2]) - (m[2:] - r[2:])))
    torch.testing.assert_close(out.losses.detach(), expected)
    forward = compute_loss(family, policy, reference, batch, ObjectiveConfig(method="smpo", noising="forward", beta=20.0))
    assert not torch.allclose(forward.losses, out.losses)


def test_reference_can_invert():
    family, policy, reference = _family(), StandIn(0.3), StandIn(0.2)
    compute_loss(family, policy, reference, _batch(), ObjectiveConfig(inverting_network="reference"))
    assert len(policy.calls) == 1 and len(reference.calls) > 1


def test_gradient_reaches_the_policy_only():
    family, policy, reference = _family(), StandIn(0.3), StandIn(0.2)
    out = compute_loss(family, policy, reference, _batch(), ObjectiveConfig(method="smpo", beta=20.0))
    out.loss.backward()
    assert policy.w.grad is not None and policy.w.grad.abs() > 0 and reference.w.grad is None


def test_kto_from_pairs_and_images():
    family, policy, reference = _family(), StandIn(0.3), StandIn(0.2)
    batch = _batch()
    images = batch.to_images()
    assert images.desirable.tolist() == [True, True, False, False] and len(set(images.seeds)) == 4
    out = compute_loss(family, policy, reference, images, ObjectiveConfig(method="kto", beta=5.0))
    again = compute_loss(family, policy, reference, batch, ObjectiveConfig(method="kto", beta=5.0))
    torch.testing.assert_close(out.losses, again.losses)
    assert isinstance(images, ImageBatch) and out.losses.shape == (4,)


def test_kto_reference_point_over_processes():
    """With ``mean_over_processes`` (accelerate's mean-reduce in the loop) z0 is its result, clamped at 0."""
    family, policy, reference = _family(), StandIn(0.3), StandIn(0.2)
    images, cfg = _batch().to_images(), ObjectiveConfig(method="kto", beta=5.0)
    local = compute_loss(family, policy, reference, images, cfg)
    seen = []

    def other_processes_higher(value):
        seen.append(value)
        return value + 0.25

    shared = compute_loss(family, policy, reference, images, cfg, mean_over_processes=other_processes_higher)
    g = float(local.metrics["ref_mse"] - local.metrics["model_mse"])  # this batch's mean implicit reward
    assert len(seen) == 1 and not seen[0].requires_grad and float(seen[0]) == pytest.approx(g, abs=1e-6)
    assert float(local.metrics["kl_reference_point"]) == pytest.approx(max(g, 0.0), abs=1e-6)
    assert float(shared.metrics["kl_reference_point"]) == pytest.approx(max(g + 0.25, 0.0), abs=1e-6)
    assert not torch.allclose(shared.losses, local.losses)
    low = compute_loss(family, policy, reference, images, cfg, mean_over_processes=lambda v: v - 10.0)
    assert float(low.metrics["kl_reference_point"]) == 0.0


def test_config_validation_and_defaults():
    cfg = ObjectiveConfig().resolved()
    assert (cfg.method, cfg.noising, cfg.labels, cfg.beta) == ("smpo", "renoise", "smoothed", 2000.0)
    assert cfg.land_on_t is False  # the authors' grid: chosen by the world study on validation prompts
    assert ObjectiveConfig(method="dpo").resolved().noising == "forward"
    assert ObjectiveConfig(noising="ddim-inversion").resolved().effective_renoise_iters == 0
    assert not ObjectiveConfig(method="mapo").needs_reference
    with pytest.raises(ValueError, match="labels=smoothed needs method smpo"):
        ObjectiveConfig(method="dpo", labels="smoothed").resolved()
    with pytest.raises(ValueError, match="noising"):
        ObjectiveConfig(noising="sde").resolved()
    with pytest.raises(ValueError, match="needs a reference"):
        compute_loss(_family(), StandIn(0.1), None, _batch(), ObjectiveConfig(method="dpo"))


def test_inversion_guidance_uses_the_empty_prompt():
    family, policy, reference = _family(), StandIn(0.3), StandIn(0.2)
    batch = _batch()
    batch.uncond = Conditioning(torch.zeros(1, 3, 2))
    compute_loss(family, policy, reference, batch, ObjectiveConfig(inversion_guidance=2.0, inversion_steps=2))
    first_x, _, _ = policy.calls[0]
    assert first_x.shape[0] == 8  # conditional and unconditional branches in one call
    with pytest.raises(ValueError, match="uncond"):
        compute_loss(family, policy, reference, _batch(), ObjectiveConfig(inversion_guidance=2.0))


@pytest.mark.parametrize("family_name", ["sd15", "sdxl"])
def test_real_tiny_unet_with_lora_reference_starts_at_log2(family_name, tmp_path):
    """A fresh LoRA policy equals its adapters-off reference, so every pair's SmPO loss is log 2."""
    from smpo.models import add_lora, load_family, reference_view
    from smpo.models.presets import save_pipeline

    family = load_family(save_pipeline(tmp_path / family_name, family_name, "tiny"))
    policy = add_lora(family.network, rank=2)
    g = torch.Generator().manual_seed(0)
    cond = family.encode_prompts(["a", "b"], original_sizes=[(16, 16), (32, 16)], crops_coords=[(0, 0), (8, 0)])
    batch = PairBatch(torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), cond,
                      torch.tensor([0.7, 0.6]), [1, 2], uncond=family.encode_prompts([""]),
                      cond_l=family.image_conditioning(cond, original_sizes=[(20, 20), (16, 16)]))
    cfg = ObjectiveConfig(method="smpo", beta=2000.0, inversion_steps=2, inversion_guidance=1.5)
    out = compute_loss(family, policy, reference_view(policy), batch, cfg)
    torch.testing.assert_close(out.losses.detach(), torch.full((2,), LOG2), atol=1e-5, rtol=0)
    out.loss.backward()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)


def test_v_prediction_models_train_on_v_and_invert_with_eps():
    family = SD15Adapter(network=None, vae=None, text_encoders=[], tokenizers=[], alphas_cumprod=_alphas_cumprod(),
                         prediction_type="v_prediction", resolution=16)
    policy, reference = StandIn(0.3), StandIn(0.2)
    batch = _batch(1)
    out = compute_loss(family, policy, reference, batch, ObjectiveConfig(method="sft"))
    t, eps = draw_t_and_noise(batch.seeds, (4, 4, 4), T)
    abar = family.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0 = batch.latents_w
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    with torch.no_grad():
        expected = ((policy.formula(x_t, t, batch.cond.hidden_states) - v) ** 2).mean()
    torch.testing.assert_close(out.loss.detach(), expected)
    # inversion: the network's v output becomes eps = sqrt(abar) v + sqrt(1 - abar) x before stepping
    policy.calls.clear()
    eps_fn = family.eps_fn(policy, batch.cond)
    level = torch.tensor([500])
    a5 = family.alphas_cumprod[500]
    with torch.no_grad():
        raw = policy.formula(x0, level, batch.cond.hidden_states)
        torch.testing.assert_close(eps_fn(x0, level), a5.sqrt() * raw + (1 - a5).sqrt() * x0)


def test_ablation_rungs_are_settings():
    """ALGORITHM.md section 5: DPO -> + inversion -> + renoise -> + smoothed labels (SmPO)."""
    rungs = {
        "dpo": ObjectiveConfig(method="smpo", noising="forward", labels="binary", gamma=1.0, beta=40.0),
        "+inversion": ObjectiveConfig(method="smpo", noising="ddim-inversion", labels="binary", gamma=1.0, beta=40.0),
        "+renoise": ObjectiveConfig(method="smpo", noising="renoise", labels="binary", gamma=1.0, beta=40.0),
        "+smoothed": ObjectiveConfig(method="smpo", noising="renoise", labels="smoothed", gamma=1.0, beta=40.0),
    }
    evals, losses = {}, {}
    for name, cfg in rungs.items():
        family = _family()
        losses[name] = compute_loss(family, StandIn(0.3), StandIn(0.2), _batch(), cfg).losses
        evals[name] = family.network_evals
    assert evals["dpo"] == 8  # policy and reference, winners and losers
    inversion = evals["+inversion"] - 8
    assert inversion > 0 and evals["+renoise"] - 8 == 2 * inversion  # one renoise iteration doubles each step
    assert evals["+smoothed"] == evals["+renoise"]
    dpo = compute_loss(_family(), StandIn(0.3), StandIn(0.2), _batch(), ObjectiveConfig(method="dpo", beta=40.0))
    torch.testing.assert_close(losses["dpo"], dpo.losses)
    # p_win = 0.7 and 0.6 with gamma 1: lambda = 0.4 and 0.2 shrink each pair's margin
    assert (losses["+smoothed"] - LOG2).abs().lt((losses["+renoise"] - LOG2).abs()).all()


def test_inversion_noise_is_seeded_per_image_and_off_by_default():
    family, policy, reference = _family(), StandIn(0.3), StandIn(0.2)
    batch = _batch()
    cfg = ObjectiveConfig(method="smpo", beta=20.0, inversion_noise=0.1)
    noisy = compute_loss(family, policy, reference, batch, cfg).losses
    again = compute_loss(family, policy, reference, batch, cfg).losses
    torch.testing.assert_close(noisy, again)  # drawn from the pairs' seeds, not the global generator
    single = torch.cat([compute_loss(family, policy, reference, _select(batch, i), cfg).losses for i in range(2)])
    torch.testing.assert_close(noisy, single, atol=1e-6, rtol=1e-5)  # independent of the batch
    plain = compute_loss(family, policy, reference, batch, ObjectiveConfig(method="smpo", beta=20.0)).losses
    assert not torch.allclose(noisy, plain)
    assert ObjectiveConfig().inversion_noise == 0.0
    with pytest.raises(ValueError, match="inversion_noise"):
        ObjectiveConfig(method="dpo", inversion_noise=0.1).resolved()  # forward noising has no inversion
    with pytest.raises(ValueError, match="inversion_noise"):
        ObjectiveConfig(inversion_noise=-1.0).resolved()


@pytest.mark.parametrize("land_on_t", [True, False])
@pytest.mark.parametrize("method", ["smpo", "kto"])
def test_stored_reference_inversion_gives_the_live_losses(land_on_t, method):
    from smpo.inversion import invert_to_levels

    family, reference = _family(), StandIn(0.2)
    batch = _batch()
    cfg = ObjectiveConfig(method=method, beta=20.0, noising="renoise", inverting_network="reference",
                          land_on_t=land_on_t, inversion_steps=4)
    live = compute_loss(family, StandIn(0.3), reference, batch, cfg).losses
    stored = []
    for latents in (batch.latents_w, batch.latents_l):
        states = batch.cond.hidden_states
        eps_fn = family.eps_fn(reference, Conditioning(states))
        stored.append(invert_to_levels(eps_fn, latents, family.alphas_cumprod, num_steps=4, renoise_iters=1,
                                       land_on_t=land_on_t, initial_abar=family.initial_abar))
    batch.inverted_w, batch.inverted_l = stored
    reference.calls.clear()
    cached = compute_loss(family, StandIn(0.3), reference, batch, cfg).losses
    torch.testing.assert_close(cached, live, atol=1e-5, rtol=1e-5)
    # one renoised step to t (2 calls) or nothing left, then the loss's call
    assert len(reference.calls) == (2 if land_on_t else 0) + 1
    batch.inverted_w = batch.inverted_w.clone()
    batch.inverted_w[0] = float("nan")  # no stored inversion for this image (flipped, prompt dropped): live
    mixed = compute_loss(family, StandIn(0.3), reference, batch, cfg).losses
    torch.testing.assert_close(mixed, live, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="inverting_network=reference"):
        compute_loss(family, StandIn(0.3), reference, batch, replace(cfg, inverting_network="policy"))


@pytest.mark.parametrize(("method", "policy_rows", "reference_rows"), [
    ("smpo", 4, 4), ("dpo", 4, 4), ("mapo", 4, 0), ("sft", 2, 0), ("kto", 4, 4)])
def test_compute_loss_dispatches_through_the_method_table(monkeypatch, method, policy_rows, reference_rows):
    from smpo.methods import METHODS

    seen = []

    def spy(*errors, **settings):
        seen.append((errors, settings))
        return LossOutput(loss=errors[0].mean(), losses=errors[0])

    monkeypatch.setitem(METHODS, method, replace(METHODS[method], loss=spy))
    family, policy, reference = _family(), StandIn(0.3), StandIn(0.2)
    out = compute_loss(family, policy, reference, _batch(), ObjectiveConfig(method=method, noising="forward", beta=9.0))
    [(errors, settings)] = seen
    assert settings.get("beta", 9.0) == 9.0 and out.metrics["t_mean"] > 0
    # the record's batch kind decides what the networks see: 2B images for pairs and unpaired, B winners for SFT
    assert sum(x.shape[0] for x, _, _ in policy.calls) == policy_rows
    assert sum(x.shape[0] for x, _, _ in reference.calls) == reference_rows
